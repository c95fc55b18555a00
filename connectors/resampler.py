"""Flamingo's Perceiver resampler (`perceiver_resampler`): `num_latents` learned latents read the patches.

Features are projected to the resampler width `dim` (no projection when dim == in_dim), then each of
`depth` layers does
    latents += Attention(q = LN(latents), k = v = concat(LN(x), LN(latents)))   # `heads` heads
    latents += Linear(4 dim -> dim)(GELU(Linear(dim -> 4 dim)(LN(latents))))
and a final LayerNorm and Linear(dim -> D) give the tokens. As in Flamingo the attention and FFN
layers have no bias, latents start as N(0, 1) and there is no positional embedding (the encoder's
features carry their positions). Every image becomes `num_latents` tokens whatever its patch grid.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.registry import CONNECTORS


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"connector perceiver_resampler: option {name} must be a positive integer, got {value!r}")
    return value


class ResamplerLayer(nn.Module):
    """One cross-attention + feed-forward block over the latents (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, mult: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                                nn.Linear(mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        n, q_len, dim = latents.shape
        lat = self.norm_latents(latents)  # [N, L, d]
        kv = torch.cat([self.norm_media(x), lat], dim=1)  # [N, P + L, d]
        q = self.to_q(lat).reshape(n, q_len, self.heads, -1).transpose(1, 2)  # [N, h, L, d/h]
        k, v = self.to_kv(kv).reshape(n, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # [N, h, P+L, d/h]
        attn = F.scaled_dot_product_attention(q, k, v)  # [N, h, L, d/h]
        latents = latents + self.to_out(attn.transpose(1, 2).reshape(n, q_len, dim))
        return latents + self.ff(latents)  # [N, L, d]


@CONNECTORS.register("perceiver_resampler")
class PerceiverResampler(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_latents: int = 64, depth: int = 2, dim: int | None = None,
                 heads: int = 8):
        super().__init__()
        dim = in_dim if dim is None else dim
        for name, v in [("num_latents", num_latents), ("depth", depth), ("dim", dim), ("heads", heads)]:
            check_positive(name, v)
        if dim % heads:
            raise ValueError(f"connector perceiver_resampler: option heads {heads} must divide the resampler "
                             f"width dim {dim}")
        self.proj_in = nn.Identity() if dim == in_dim else nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # [L, d]
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    @staticmethod
    def num_tokens(grid: tuple[int, int], num_latents: int = 64, **resampler_options) -> int:
        return check_positive("num_latents", num_latents)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.proj_in(feats)  # [N, P, d]
        latents = self.latents.expand(x.shape[0], -1, -1)  # [N, L, d]
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj_out(self.norm(latents))  # [N, L, D]
