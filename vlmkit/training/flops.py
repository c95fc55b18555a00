"""Model FLOPs of training steps, for MFU (model FLOPs utilisation: recomputation and padding are waste).

The count follows the usual convention (and the peer baseline's, ../shared/bench/peer_hf_llava.py): a
weight matrix costs 2 FLOPs per parameter per token in the forward; causal attention 2 * layers * T^2 * width
per sample (QK^T and AV over half the square); a trained part's backward costs twice its forward, a frozen
part that gradients must cross (an LLM behind a trained connector) once its forward, a frozen part nothing
flows into none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# dense bf16 tensor-core peaks (TFLOP/s, vendors' datasheets, without sparsity); VLMKIT_PEAK_TFLOPS overrides
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s: VLMKIT_PEAK_TFLOPS if set, else the datasheet figure of a known
    CUDA GPU, else None (no MFU is shown)."""
    import os

    env = os.environ.get("VLMKIT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def _linear_params(module: torch.nn.Module, skip: tuple = ()) -> int:
    """Weights of the module's nn.Linear layers (`skip`: modules left out, e.g. the LM head). Embeddings,
    position tables and the patch convolution are not counted, as in the peer's formula."""
    skipped = {id(m) for m in skip if m is not None}
    return sum(getattr(m.weight, "ds_numel", None) or m.weight.numel() for m in module.modules()  # ZeRO-3: whole
               if isinstance(m, torch.nn.Linear) and id(m) not in skipped and m.weight is not None)


@dataclass(frozen=True)
class FlopCounter:
    """Forward FLOPs of each part of one model, and each part's multiplier in a stage (3: trained, 2: only
    input gradients cross it, 1: forward only, 0: not run)."""

    llm_linear: int  # decoder weight-matrix parameters (no embedding, no head)
    llm_head: int  # hidden * vocab
    llm_layers: int
    llm_width: int
    enc_linear: int
    enc_layers: int
    enc_width: int
    enc_tokens: int  # sequence length through the encoder per tile (patches + prefix tokens)
    conn_linear: int
    tokens_per_tile: int
    mult_llm: int = 3
    mult_enc: int = 1
    mult_conn: int = 3

    @classmethod
    def for_model(cls, model) -> FlopCounter:
        llm = model.llm
        cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
        emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
        enc = model.encoder
        ecfg = getattr(getattr(enc, "model", None), "config", None)
        grid = enc.grid
        prefix = getattr(getattr(enc, "layout", None), "prefix", 0) or 0
        return cls(
            llm_linear=_linear_params(llm, (emb, head)),
            llm_head=int(cfg.hidden_size) * int(getattr(cfg, "vocab_size", emb.num_embeddings)),
            llm_layers=int(cfg.num_hidden_layers), llm_width=int(cfg.hidden_size),
            enc_linear=_linear_params(enc), enc_layers=int(getattr(ecfg, "num_hidden_layers", 0) or 0),
            enc_width=int(getattr(ecfg, "hidden_size", 0) or 0), enc_tokens=grid[0] * grid[1] + int(prefix),
            conn_linear=_linear_params(model.connector), tokens_per_tile=model.count_image_tokens.tokens_per_tile)

    def with_stage(self, model) -> FlopCounter:
        """The multipliers of the stage now applied to `model` (which parameters require grad)."""
        from dataclasses import replace

        def trains(m):
            return any(p.requires_grad for p in m.parameters())

        enc, conn = trains(model.encoder), trains(model.connector)
        full_llm = any(p.requires_grad and len(getattr(p, "ds_shape", None) or p.shape) >= 2 and "lora_" not in n
                       for n, p in model.llm.named_parameters())  # ds_shape: a ZeRO-3 shard's whole shape
        llm = 3 if full_llm else 2 if (enc or conn or trains(model.llm)) else 1
        return replace(self, mult_llm=llm, mult_enc=3 if enc else 1, mult_conn=3 if conn else 2 if enc else 1)

    def llm_forward(self, tokens: int) -> float:
        """One sample of `tokens` tokens through the LLM (forward)."""
        return 2.0 * (self.llm_linear + self.llm_head) * tokens + 2.0 * self.llm_layers * tokens * tokens * self.llm_width

    def tile_forward(self) -> tuple[float, float]:
        """(encoder, connector) forward FLOPs of one tile."""
        t = self.enc_tokens
        enc = 2.0 * self.enc_linear * t + 4.0 * self.enc_layers * t * t * self.enc_width
        return enc, 2.0 * self.conn_linear * self.tokens_per_tile

    def step(self, lengths: list[int], tiles: int) -> tuple[float, float]:
        """(model FLOPs, of which the LLM's) of samples with `lengths` real tokens each and `tiles` image tiles."""
        llm = self.mult_llm * sum(self.llm_forward(n) for n in lengths)
        enc, conn = self.tile_forward()
        return llm + tiles * (self.mult_enc * enc + self.mult_conn * conn), llm
