"""Attention over packed batches: several samples concatenated in one row, each attending only to itself.

A packed batch (`vlmkit.data.processor.collate(..., pack=True)`) carries `position_ids` restarting at 0
for each sample and `cu_seqlens`, the sample boundaries over the flattened rows. Two ways honour them:

- transformers' own masks (attn_implementation `sdpa`, `eager`, `flex_attention`): with no 2D attention
  mask, no cache and `position_ids` that restart, transformers' masking_utils detects the packing
  (`find_packed_sequence_indices`) and builds a block-diagonal causal mask: a dense [T, T] mask for sdpa /
  eager (the whole square is computed, then masked: quadratic in the row length), a BlockMask for flex.
- `varlen` (registered here as `vlmkit_varlen`): attention per sample from `cu_seqlens`, with no mask at
  all: on CUDA one call of PyTorch's variable-length flash attention (`torch.nn.attention.varlen`), elsewhere
  (or where that is missing) one causal SDPA call per sample. Only the T_i x T_i triangles are computed.
  Unpacked batches (generation, evaluation) fall back to plain SDPA with transformers' sdpa mask.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
import torch.nn.functional as F

VARLEN = "vlmkit_varlen"
"""The name `varlen` is registered under in transformers' AttentionInterface."""
ALIASES = {"varlen": VARLEN}
PACKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", VARLEN)
"""Attention implementations that keep the samples of a packed row apart (checked on CPU by tests/test_packing.py)."""

_PACKED = contextvars.ContextVar("vlmkit_packed", default=False)


@contextlib.contextmanager
def packed_forward():
    """While set, the `varlen` mask function builds no mask: the attention takes the boundaries from `cu_seqlens`."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def resolve(name: str | None) -> str | None:
    """An LLMConfig.attn_implementation -> the name transformers gets (`varlen` registered on first use)."""
    if name in ALIASES or name == VARLEN:
        register()
        return ALIASES.get(name, name)
    return name


def register() -> None:
    """Register `vlmkit_varlen` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def _varlen_mask(*args, **kwargs):
    """transformers' sdpa mask for unpacked batches (padding, generation); none inside `packed_forward()`."""
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[R, L] positions restarting at 0 per sample -> int32 [S+1] boundaries over the flattened rows."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention signature: query [B, H, T, D], key / value [B, Hkv, T, D] -> ([B, T, H, D], None).

    With `cu_seq_lens_q` (passed by VLM.forward for a packed batch) each sample attends causally to itself only;
    without it this is transformers' SDPA attention (with its mask: padding, generation).
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and attention_mask is None and kwargs.get("position_ids") is not None and query.shape[2] > 1:
        pos = kwargs["position_ids"]
        if bool((pos.reshape(-1)[1:] == 0).any()):  # packed without boundaries given: derive them (a host sync)
            cu = cu_seqlens_from_position_ids(pos.expand(query.shape[0], -1))
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError("varlen attention has no attention dropout: set the LLM's attention_dropout to 0")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"varlen attention does not support {unsupported}: use attn_implementation "
                                      "sdpa or flex_attention for this LLM")
    B, H, T, D = query.shape
    dtype = compute_dtype(query)
    q = query.transpose(1, 2).reshape(B * T, H, D).to(dtype)  # [N, H, D] (q was [B, T, H, D] before its transpose)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D).to(dtype)  # [N, Hkv, D]
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D).to(dtype)
    cu = cu.to(device=q.device, dtype=torch.int32)
    max_len = kwargs.get("max_length_q")
    out = None
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash_varlen(q, k, v, cu, max_len, scaling)
    if out is None:
        out = _per_sample_sdpa(q, k, v, cu, scaling)
    return out.view(B, T, H, D), None


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's when autocast is on for the query's device, else the query's.

    Under autocast with float32 weights (accelerate's `mixed_precision: bf16` over an fp32 model) the
    projections come out in bf16, but the rotary embedding multiplies them by cos / sin in the residual
    stream's dtype (float32), so q and k arrive in float32 while v is bf16. torch's SDPA is on autocast's
    list and casts by itself; the variable-length kernel is not, and would see float32 queries: no flash
    kernel, a per-sample loop with a host sync instead (4x slower at 1.5B). Cast here, as SDPA would."""
    device = query.device.type
    if query.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _per_sample_sdpa(q, k, v, cu, scaling):
    """One causal SDPA call per sample: exact, any device, any dtype."""
    outs = []
    gqa = q.shape[1] != k.shape[1]
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                           v[s:e].transpose(0, 1)[None], is_causal=True, scale=scaling,
                                           enable_gqa=gqa)  # [1, H, L, D]
        outs.append(o[0].transpose(0, 1))  # [L, H, D]
    return torch.cat(outs)


_VARLEN_FN = None


def _varlen_fn():
    """(torch's varlen_attn, its parameter names) or None where this torch has none."""
    global _VARLEN_FN
    if _VARLEN_FN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN_FN = (None, frozenset())
        else:
            _VARLEN_FN = (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))
    return _VARLEN_FN if _VARLEN_FN[0] is not None else None


def _flash_varlen(q, k, v, cu, max_len, scaling):
    """PyTorch's variable-length flash attention (one kernel for all samples), or None where unavailable.

    Its signature changed across torch 2.9-2.13 (is_causal= vs window_size=(-1, 0); scale=, enable_gqa=
    added): the parameters are read from the function itself.
    """
    found = _varlen_fn()
    if found is None:
        return None
    fn, params = found
    D = q.shape[-1]
    kw = {}
    if scaling is not None and abs(scaling - D ** -0.5) > 1e-12 * D:
        if "scale" not in params:
            return None
        kw["scale"] = scaling
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        return None
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    return fn(q, k, v, cu, cu, int(max_len), int(max_len), **kw)
