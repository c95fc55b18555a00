"""The LLaVA-1.5 projector (`mlp2x_gelu`): Linear(C -> D) -> GELU -> Linear(D -> D), with bias."""
import torch
from torch import nn

from vlmkit.registry import CONNECTORS


@CONNECTORS.register("mlp2x_gelu")
class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        # transformers' Llava names these multi_modal_projector.linear_1 / linear_2
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim) if depth >= 2 else None
        self.extra = nn.ModuleList(nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim)) for _ in range(depth - 2))

    @staticmethod
    def num_tokens(grid: tuple[int, int], **options) -> int:
        return grid[0] * grid[1]

    @staticmethod
    def out_grid(grid: tuple[int, int], **options) -> tuple[int, int]:
        """(rows, cols) of its output tokens, row-major: the patch grid itself (video pooling reads it)."""
        return tuple(grid)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.linear_1(feats)  # [N, P, D]
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        for layer in self.extra:
            x = layer(x)
        return x
