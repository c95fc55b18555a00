"""Average pooling + the LLaVA MLP (`avgpool_mlp`): a k x k mean over the patch grid, then
Linear(C -> D) -> GELU -> Linear(D -> D).

Windows have stride k and start at the top-left patch. When a side of the grid is not divisible by
k, the last window on that side is cut short and averages only the patches inside the grid (ceil
mode), so a (rows, cols) grid gives ceil(rows/k) * ceil(cols/k) tokens, row-major.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.registry import CONNECTORS


def check_kernel(kernel: int) -> int:
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1:
        raise ValueError(f"connector avgpool_mlp: option kernel must be a positive integer, got {kernel!r}")
    return kernel


def avg_pool_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, R, C, ch] -> [N, ceil(R/k), ceil(C/k), ch]: the mean of each k x k window's in-grid patches."""
    n, rows, cols, ch = x.shape
    pr, pc = -rows % k, -cols % k
    ones = x.new_ones(1, rows, cols, 1)
    x, ones = F.pad(x, (0, 0, 0, pc, 0, pr)), F.pad(ones, (0, 0, 0, pc, 0, pr))  # zeros after the grid
    r, c = (rows + pr) // k, (cols + pc) // k
    total = x.reshape(n, r, k, c, k, ch).sum((2, 4))  # [N, r, c, ch]
    count = ones.reshape(1, r, k, c, k, 1).sum((2, 4))  # [1, r, c, 1] patches inside each window
    return total / count


@CONNECTORS.register("avgpool_mlp")
class AvgPoolMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kernel: int = 2):
        super().__init__()
        self.kernel = check_kernel(kernel)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    @staticmethod
    def num_tokens(grid: tuple[int, int], kernel: int = 2) -> int:
        k = check_kernel(kernel)
        return math.ceil(grid[0] / k) * math.ceil(grid[1] / k)

    @staticmethod
    def out_grid(grid: tuple[int, int], kernel: int = 2) -> tuple[int, int]:
        """(rows, cols) of its output tokens, row-major: ceil of the grid over the kernel per side."""
        k = check_kernel(kernel)
        return math.ceil(grid[0] / k), math.ceil(grid[1] / k)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, p, ch = feats.shape  # [N, P, C]
        if p != grid[0] * grid[1]:
            raise ValueError(f"connector avgpool_mlp: {p} patch features do not form the "
                             f"{grid[0]}x{grid[1]} grid (rows x cols)")
        x = avg_pool_grid(feats.reshape(n, grid[0], grid[1], ch), self.kernel).reshape(n, -1, ch)  # [N, P', C]
        return self.linear_2(self.act(self.linear_1(x)))  # [N, P', D]
