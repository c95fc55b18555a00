"""BLIP-2's Q-Former (`qformer`): learned queries cross-attend to the encoder output, then Linear(H -> D).

Wired as transformers' `Blip2ForConditionalGeneration.get_image_features` wires it: the encoder
features go through a LayerNorm (the role of BLIP-2's `ln_vision`, transformers' vision
`post_layernorm`, eps 1e-6), the `num_queries` query tokens (init N(0, 0.02)) run through
transformers' `Blip2QFormerModel` (cross-attention to the features every `cross_attention_frequency`-th
layer, from layer 0), and `language_projection` maps the query outputs to the LLM width.
Every image becomes `num_queries` tokens whatever its patch grid.
"""
import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlmkit.registry import CONNECTORS


def check_queries(num_queries: int) -> int:
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ValueError(f"connector qformer: option num_queries must be a positive integer, got {num_queries!r}")
    return num_queries


@CONNECTORS.register("qformer")
class QFormerConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, intermediate_size: int = 3072,
                 cross_attention_frequency: int = 2, dropout: float = 0.1):
        super().__init__()
        check_queries(num_queries)
        for name, v in [("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                        ("num_attention_heads", num_attention_heads), ("intermediate_size", intermediate_size),
                        ("cross_attention_frequency", cross_attention_frequency)]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"connector qformer: option {name} must be a positive integer, got {v!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"connector qformer: option dropout must be a number in [0, 1), got {dropout!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"connector qformer: option num_attention_heads {num_attention_heads} must divide "
                             f"hidden_size {hidden_size}")
        config = Blip2QFormerConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                    num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                                    cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=in_dim,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)  # [1, Q, H]
        self.layernorm = nn.LayerNorm(in_dim, eps=1e-6)
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(hidden_size, out_dim)

    @staticmethod
    def num_tokens(grid: tuple[int, int], num_queries: int = 32, **qformer_options) -> int:
        return check_queries(num_queries)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        feats = self.layernorm(feats)  # [N, P, C]
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)  # [N, Q, H]
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state  # [N, Q, H]
        return self.language_projection(out.to(feats.dtype))  # [N, Q, D]
