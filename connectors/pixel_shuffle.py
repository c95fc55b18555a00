"""InternVL's projector (`pixel_shuffle`): space-to-depth, then LayerNorm -> Linear -> GELU -> Linear.

Pixel shuffle at `scale` s = 1/k folds each k x k block of patches into one token of k*k*C channels,
in the element order of InternVL's "v2" `pixel_shuffle` (transformers' `InternVLModel.pixel_shuffle`):
for k = 2 the token at (i, j) holds the channels of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j),
(2i+1, 2j+1), in that order. A 32x32 grid (InternViT at 448px) gives 256 tokens per tile.
Submodule names match transformers' `InternVLMultiModalProjector` (layer_norm, linear_1, act, linear_2).
"""
import torch
from torch import nn

from vlmkit.registry import CONNECTORS


def shuffle_factor(scale: float, grid: tuple[int, int] | None = None) -> int:
    """k = 1/scale, checked to be a whole number that divides both sides of `grid` (rows, cols)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
        raise ValueError(f"connector pixel_shuffle: option scale must be a number in (0, 1], got {scale!r}")
    k = round(1 / scale)
    if abs(k * scale - 1) > 1e-6:
        raise ValueError(f"connector pixel_shuffle: option scale must be 1/k for a whole k (0.5, 0.25, ...), "
                         f"got {scale!r}")
    if grid is not None and (grid[0] % k or grid[1] % k):
        raise ValueError(f"connector pixel_shuffle: scale {scale} folds {k}x{k} patch blocks, so both sides of the "
                         f"patch grid must be divisible by {k}; the grid is {grid[0]}x{grid[1]} (rows x cols)")
    return k


def pixel_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, R, C, ch] -> [N, R/k, C/k, k*k*ch] in InternVL's "v2" order (the same reshapes, named by axis)."""
    n, rows, cols, ch = x.shape
    x = x.reshape(n, rows, cols // k, ch * k)  # fold k neighbouring columns into channels
    x = x.permute(0, 2, 1, 3).reshape(n, cols // k, rows // k, ch * k * k)  # fold k neighbouring rows
    return x.permute(0, 2, 1, 3).contiguous()  # [N, R/k, C/k, k*k*ch], row-major again


@CONNECTORS.register("pixel_shuffle")
class PixelShuffleProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, scale: float = 0.5):
        super().__init__()
        self.k = shuffle_factor(scale)
        self.scale = scale
        width = in_dim * self.k * self.k
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    @staticmethod
    def grid_multiple(scale: float = 0.5) -> int:
        """k: both sides of the patch grid must be multiples of it (NaFlex rounds each image's grid to it)."""
        return shuffle_factor(scale)

    @staticmethod
    def num_tokens(grid: tuple[int, int], scale: float = 0.5) -> int:
        k = shuffle_factor(scale, grid)
        return (grid[0] // k) * (grid[1] // k)

    @staticmethod
    def out_grid(grid: tuple[int, int], scale: float = 0.5) -> tuple[int, int]:
        """(rows, cols) of its output tokens, row-major: the grid folded by k per side."""
        k = shuffle_factor(scale, grid)
        return grid[0] // k, grid[1] // k

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shuffle_factor(self.scale, grid)
        n, p, ch = feats.shape  # [N, P, C]
        if p != grid[0] * grid[1]:
            raise ValueError(f"connector pixel_shuffle: {p} patch features do not form the "
                             f"{grid[0]}x{grid[1]} grid (rows x cols)")
        x = pixel_shuffle(feats.reshape(n, grid[0], grid[1], ch), self.k)  # [N, R/k, C/k, k*k*C]
        x = x.reshape(n, -1, x.shape[-1])  # [N, P/k^2, k*k*C]
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))  # [N, P/k^2, D]
