"""Training precision: where the weights live, what the matrix work runs in, what the optimizer keeps.

AdamW on bf16 weights rounds away every update smaller than about 1/256 of the weight (bf16 keeps 8
significant bits); at LLaVA's stage-2 learning rate (2e-5) most updates are that small. The regimes
(`train.precision`):

- `bf16-master` (the default under `mixed_precision: bf16`, one process or DDP): the model's weights are
  bf16, so every matrix product, activation and gradient is bf16 (as a pure-bf16 trainer's); the optimizer
  keeps an fp32 master copy of each *trainable* weight and fp32 states (`MasterAdamW`), steps the master
  and rounds it back into the model. Frozen parts (the encoder, stage 1's LLM) have no fp32 copy at all.
  This is DeepSpeed's bf16 mode and Megatron's mixed precision.
- `autocast`: fp32 weights under `torch.autocast` (accelerate's own mixed precision): same update
  precision, but every forward casts the weights and the residual stream stays fp32 (slower, more
  activation memory).
- `bf16-pure`: bf16 weights and bf16 optimizer states: small updates are lost. For comparisons only.
- `fp32`: no mixed precision (`mixed_precision: no`, the CPU default).

DeepSpeed and FSDP keep their own fp32 master weights (DeepSpeed's bf16 mode, FSDP2's MixedPrecisionPolicy):
under them `auto` leaves the weights to the engine.
"""
from __future__ import annotations

import torch

from ..config import TrainConfig

REGIMES = TrainConfig.PRECISIONS  # train.precision's values, listed where the config checks them
DESCRIPTION = {
    "bf16-master": "bf16 weights and matrix work; fp32 master weights and optimizer states for the trained parameters",
    "autocast": "fp32 weights, matrix work under torch.autocast",
    "bf16-pure": "bf16 weights and optimizer states: updates under ~1/256 of a weight are lost",
    "fp32": "fp32 weights and matrix work",
    "engine": "the engine's own: 16-bit weights, fp32 master weights in its optimizer",
}


def resolve(requested: str, mixed_precision: str | None, engine: str, quantized: bool = False) -> str:
    """The regime a run trains in: `requested` (TrainConfig.precision) given accelerate's `mixed_precision`
    (no | bf16 | fp16) and the engine (none | ddp | deepspeed | fsdp). `engine` means "left to the engine"."""
    if requested not in REGIMES:
        raise ValueError(f"train.precision must be one of {', '.join(REGIMES)}, got {requested!r}")
    mp = mixed_precision or "no"
    if engine in ("deepspeed", "fsdp"):
        if requested not in ("auto", "autocast"):
            raise ValueError(f"train.precision {requested!r}: under {engine} the engine keeps the fp32 master weights "
                             "itself; use train.precision auto")
        return "engine"
    if requested == "auto":
        if mp == "bf16" and not quantized:
            return "bf16-master"
        return "fp32" if mp == "no" else "autocast"
    if requested in ("bf16-master", "bf16-pure") and mp != "bf16":
        raise ValueError(f"train.precision {requested} computes in bf16: set train.mixed_precision: bf16 "
                         f"(now {mp})")
    if requested == "fp32" and mp != "no":
        raise ValueError(f"train.precision fp32 with mixed_precision {mp}: set mixed_precision: no")
    if requested == "autocast" and mp == "no":
        raise ValueError("train.precision autocast needs train.mixed_precision bf16 or fp16")
    if quantized and requested in ("bf16-master", "bf16-pure"):
        raise ValueError("a 4-bit LLM (llm.quantization) keeps its own compute dtype: use train.precision auto")
    return requested


def weight_dtype(regime: str) -> torch.dtype | None:
    """The dtype the model's weights are kept in under `regime` (None: as built, the engine decides)."""
    return torch.bfloat16 if regime in ("bf16-master", "bf16-pure") else None


class MasterWeights:
    """An optimizer over fp32 master copies of 16-bit parameters: mixed in before a torch optimizer class
    (`MasterAdamW`, `with_masters(cls)`), whose `step` then updates the masters.

    Built from the model's parameter groups (16-bit or fp32 parameters; an fp32 one is its own master). The
    model keeps computing in its own dtype; `step` turns each 16-bit gradient into fp32, steps the masters
    (with the optimizer's own states: fp32 for AdamW, fused on CUDA where asked; 8-bit blocks for bitsandbytes'
    AdamW8bit) and copies each master back into its parameter, rounded to the nearest 16-bit value. Gradients
    are converted a bucket of about `bucket_bytes` at a time, so the fp32 gradients never all exist at once.
    `state_dict` carries the masters: a resumed run continues from the exact fp32 weights, not from their
    rounded copies in the model folder.
    """

    def __init__(self, groups, bucket_bytes: int = 2 << 30, **kwargs):
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model parameter, fp32 master)
        master_groups = []
        for g in groups:
            masters = []
            for p in g["params"]:
                m = p if p.dtype == torch.float32 else p.detach().to(torch.float32, copy=True)
                self._pairs.append((p, m))
                masters.append(m)
            master_groups.append({**g, "params": masters})
        super().__init__(master_groups, **kwargs)
        self.bucket_bytes = int(bucket_bytes)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW takes no closure")
        grads = {id(m): p.grad for p, m in self._pairs if p.grad is not None}
        for p, m in self._pairs:  # AdamW steps exactly the masters that hold a gradient: one bucket at a time
            if m is p:
                p.grad = None
        for bucket in self._buckets_of(grads):
            for p, m in bucket:
                g = grads[id(m)]
                m.grad = g if g.dtype == torch.float32 else g.to(torch.float32)
            super().step()
            for p, m in bucket:
                if m is not p:
                    m.grad = None
                    p.copy_(m)
                else:
                    p.grad = grads[id(m)]  # an fp32 parameter keeps its gradient, as with plain AdamW
        return None

    def _buckets_of(self, grads: dict):
        bucket, size = [], 0
        for p, m in self._pairs:
            if id(m) not in grads:
                continue
            bucket.append((p, m))
            size += m.numel() * 4
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def zero_grad(self, set_to_none: bool = True):
        for p, m in self._pairs:
            for t in (p, m) if m is not p else (p,):
                if t.grad is None:
                    continue
                if set_to_none:
                    t.grad = None
                else:
                    t.grad.zero_()

    def state_dict(self):
        sd = super().state_dict()
        sd["master_weights"] = [None if m is p else m for p, m in self._pairs]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:
            return
        if len(masters) != len(self._pairs):
            raise ValueError(f"optimizer state holds {len(masters)} master weights, the model trains "
                             f"{len(self._pairs)} parameters")
        with torch.no_grad():
            for (p, m), saved in zip(self._pairs, masters):
                if saved is not None and m is not p:
                    m.copy_(saved)
                    p.copy_(m)

    def master_bytes(self) -> int:
        """Bytes held by the fp32 masters (parameters that are their own master not counted)."""
        return sum(m.numel() * 4 for p, m in self._pairs if m is not p)


class MasterAdamW(MasterWeights, torch.optim.AdamW):
    """AdamW over fp32 master copies of 16-bit parameters (see `MasterWeights`); fp32 states."""


def with_masters(optimizer_cls: type) -> type:
    """`optimizer_cls` stepping fp32 master copies of 16-bit parameters (MasterAdamW for torch's AdamW)."""
    if optimizer_cls is torch.optim.AdamW:
        return MasterAdamW
    return type(f"Master{optimizer_cls.__name__}", (MasterWeights, optimizer_cls),
                {"__doc__": f"{optimizer_cls.__name__} over fp32 master copies of 16-bit parameters (MasterWeights)."})
