"""A stage's optimizer and learning-rate schedule, as its config names them (`StageConfig.optimizer`, `betas`,
`eps`, `lr_scheduler`, `lr_scheduler_kwargs`), over the stage's parameter groups (`stages.param_groups`).

Optimizers:
- `adamw` (default): torch's AdamW, fused on CUDA.
- `adamw_8bit`: bitsandbytes' AdamW8bit (block-wise 8-bit first and second moments: 2 bytes of state per
  trained weight instead of 8). CUDA only, and bitsandbytes must be installed: both are checked before the
  model is built (`check_stages`). With the precision regimes (vlmkit/training/precision.py):
  `bf16-master` keeps its fp32 master weights and the 8-bit states belong to the masters
  (`with_masters(AdamW8bit)`: the update is computed on fp32 weights, as with adamw, only the moments are
  quantized); `fp32` / `autocast`: the fp32 weights; `bf16-pure`: the bf16 weights (small updates lost, as
  with adamw); under DeepSpeed / FSDP (`engine`) it is refused: the engines shard and step their own
  optimizer states, and bitsandbytes' per-block states do not follow their shards.

Schedules: any name `transformers.get_scheduler` knows (but the metric-driven ones: StageConfig.SCHEDULERS_REFUSED),
built by it with the stage's warmup (`warmup_ratio` of its steps) and `lr_scheduler_kwargs`; the default
(cosine) is `get_cosine_schedule_with_warmup`, as before this was configurable.
"""
from __future__ import annotations

import torch

from ..config import ConfigError, StageConfig
from ..extras import require
from .precision import with_masters
from .stages import param_groups


def make_optimizer(accelerator, raw, stage: StageConfig, precision: str) -> torch.optim.Optimizer:
    """The stage's optimizer over its parameter groups; under `bf16-master` over fp32 masters of the bf16 weights
    (made on the training device, so the model goes there first: accelerate's prepare would move it anyway)."""
    device = accelerator.device.type
    kw = dict(lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps)
    if stage.optimizer == "adamw_8bit":
        cls = adamw_8bit_class(stage, device, precision)
    else:
        cls = torch.optim.AdamW
        kw["fused"] = device == "cuda"
    if precision == "bf16-master":
        raw.to(accelerator.device)
        return with_masters(cls)(param_groups(raw, stage), **kw)  # MasterAdamW for AdamW
    return cls(param_groups(raw, stage), **kw)


def adamw_8bit_class(stage: StageConfig, device: str, precision: str) -> type:
    """bitsandbytes' AdamW8bit, or an error saying why the stage cannot use it here."""
    where = f"stage {stage.name}: optimizer adamw_8bit"
    if precision == "engine":
        raise ConfigError(f"{where} under DeepSpeed / FSDP: the engine shards and steps its own optimizer states, "
                          "which bitsandbytes' 8-bit blocks do not follow; use optimizer: adamw")
    if device != "cuda":
        raise ConfigError(f"{where} needs a CUDA device (bitsandbytes' 8-bit AdamW kernels), this run is on "
                          f"{device}; use optimizer: adamw")
    bnb = require("bitsandbytes", "qlora", where)
    return bnb.optim.AdamW8bit


def make_scheduler(opt: torch.optim.Optimizer, stage: StageConfig, total: int):
    """`transformers.get_scheduler(stage.lr_scheduler)` over `total` optimizer steps, warmup from `warmup_ratio`."""
    from transformers import get_scheduler

    try:
        return get_scheduler(stage.lr_scheduler, opt, num_warmup_steps=stage.warmup_steps(total),
                             num_training_steps=total, scheduler_specific_kwargs=dict(stage.lr_scheduler_kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"stage {stage.name}: lr_scheduler {stage.lr_scheduler} with lr_scheduler_kwargs "
                          f"{stage.lr_scheduler_kwargs}: {e}") from None


def check_stages(stages: list[StageConfig], device: str, precision: str) -> None:
    """Before the model is built: every stage's optimizer can run here (adamw_8bit: CUDA, bitsandbytes, not under
    an engine) and its schedule builds with its kwargs (on a stand-in optimizer over 100 steps)."""
    for stage in stages:
        if stage.optimizer == "adamw_8bit":
            adamw_8bit_class(stage, device, precision)
        stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=stage.lr)
        make_scheduler(stand_in, stage, 100)
