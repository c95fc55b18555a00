"""Engine specifics: accelerate, DeepSpeed (ZeRO-2/3) and FSDP, each workaround named where it lives.

The loop (`vlmkit.training.loop`) asks this file what kind of engine it runs under (`engine`, `shards_weights`),
has it write the stage's batch shape where the engine reads it (`configure_engine`) and gathers sharded weights
through it (`full_state_dict`); nothing else in the loop knows DeepSpeed or FSDP exist.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

from ..config import RunConfig, TrainConfig
from .distributed import destroy_at_exit


def make_accelerator(cfg: TrainConfig, cpu: bool = False) -> Accelerator:
    """Accumulation is counted by the loop itself (full windows), not by the data loader's end. The trackers of
    `cfg.log_with` are built here (a missing package is an error now) and started by `run`."""
    from .trackers import build

    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cpu,
        log_with=build(cfg) or None,
        project_dir=cfg.output_dir,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        # each epoch's order is a function of (seed, epoch): what makes a resumed run see the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    cpu_threads(acc)
    destroy_at_exit()  # the process group ends before Python finalizes (vlmkit/training/distributed.py says why)
    return acc


def cpu_threads(accelerator: Accelerator) -> None:
    """Training on CPU: give each process its share of the cores.

    `accelerate launch` without a config sets OMP_NUM_THREADS=1 on a machine with no GPU (its
    per-core default applies only with --cpu), halving a 2-core laptop's speed. A thread count the
    user chose (VLMKIT_CPU_THREADS, or OMP_NUM_THREADS other than that launcher default) is kept.
    """
    if accelerator.device.type != "cpu":
        return
    chosen = os.environ.get("VLMKIT_CPU_THREADS")
    if chosen:
        torch.set_num_threads(int(chosen))
    elif os.environ.get("OMP_NUM_THREADS") == "1" and "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # the launcher's
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def engine(accelerator: Accelerator) -> str:
    """How the model is distributed: deepspeed | fsdp | ddp (or another data-parallel wrapper) | none."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "none" if accelerator.num_processes == 1 or kind == DistributedType.NO else "ddp"


def shards_weights(accelerator: Accelerator) -> bool:
    """Does each process hold only a shard of the weights (DeepSpeed ZeRO-3, FSDP)? Then saving gathers them."""
    kind = engine(accelerator)
    if kind == "deepspeed":
        return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0)) == 3
    return kind == "fsdp"


def configure_engine(accelerator: Accelerator, micro: int, accum: int, max_grad_norm: float,
                     hidden_size: int | None = None) -> None:
    """Set this stage's micro-batch, accumulation and clipping where the engine reads them, before `prepare`.

    DeepSpeed: accelerate fills the config's "auto" entries only once (at the first prepare); each stage
    re-prepares with its own batch shape, so the values are written here every stage. DeepSpeed divides the
    loss by its `gradient_accumulation_steps` in `engine.backward` and averages gradients over processes, and
    accelerate's wrapper runs `engine.step()` (clipping at `gradient_clipping`, optimizer step, zero grad)
    in the backward of the window's last micro-batch: with `gradient_accumulation_steps` = `accum` the loop's
    `loss * accum * world` gives the token-mean gradient of the whole global batch, as under DDP.
    `hidden_size` (the LLM's) fills the ZeRO bucket sizes left "auto" (accelerate reads them off
    `model.config.hidden_size`, which a VLM's config does not have), with accelerate's own formulas.
    """
    accelerator.gradient_accumulation_steps = accum
    if engine(accelerator) != "deepspeed":
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * accelerator.num_processes
    cfg["gradient_clipping"] = float(max_grad_norm)
    zero = cfg.get("zero_optimization", {})
    if hidden_size:
        h = int(hidden_size)
        for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                           ("stage3_param_persistence_threshold", 10 * h)):
            if zero.get(key) == "auto":
                zero[key] = value


def match_zero3_dtype(accelerator: Accelerator, model) -> None:
    """ZeRO-3 builds transformers' parts (encoder, LLM) already partitioned in the engine's 16-bit dtype
    (zero.Init through accelerate's HfDeepSpeedConfig) and leaves every such parameter's dtype alone; parts
    vlmkit builds itself (connector, image_newline) arrive in float32. A stage training both would give
    DeepSpeed one group of mixed dtypes, which it refuses: cast the rest to the engine's dtype before the
    first prepare (DeepSpeed keeps float32 master weights for the optimizer)."""
    if engine(accelerator) != "deepspeed":
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.get("zero_optimization", {}).get("stage") != 3:
        return
    dtype = (torch.bfloat16 if cfg.get("bf16", {}).get("enabled") is True
             else torch.float16 if cfg.get("fp16", {}).get("enabled") is True else None)
    if dtype is None:
        return
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@contextmanager
def plain_init():
    """Build transformers models as whole, unpartitioned modules even while a ZeRO-3 engine is configured.

    accelerate registers its DeepSpeed config with transformers (HfDeepSpeedConfig), after which every
    `from_config` / `from_pretrained` partitions the new model under zero.Init; vlmkit's loader builds on
    the meta device, which zero.Init cannot take ("Cannot copy out of meta tensor"). transformers keeps
    that registration in one module-level weak reference: it is cleared here and restored after."""
    try:
        import transformers.integrations.deepspeed as hf_ds
    except ImportError:  # transformers without its DeepSpeed integration
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def refresh_fsdp_precision(model) -> None:
    """FSDP2 fixes each parameter group's reduce / output gradient dtype at its first forward, from the parameters
    trainable then: a group frozen in stage 1 and trained in stage 2 would get bf16 gradients on fp32 weights.
    Recompute them after each stage's plan is applied (a no-op before the model is sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
            if group is not None and getattr(group, "fsdp_params", None):
                group._init_mp_dtypes()  # torch's own (lazy-init) computation of those dtypes


def full_state_dict(accelerator: Accelerator, model) -> dict | None:
    """The whole model's weights from a prepared model whose weights are sharded (ZeRO-3: DeepSpeed's 16-bit
    consolidation, needs `stage3_gather_16bit_weights_on_model_save`; FSDP: a full state dict offloaded to
    CPU). A collective: every process calls it; the main process gets the tensors. None when not sharded
    (the unwrapped model holds every weight)."""
    if not shards_weights(accelerator):
        return None
    state = accelerator.get_state_dict(model, unwrap=False)
    return {k: v.detach().cpu() for k, v in state.items()} if accelerator.is_main_process else None



def build_device(accelerator: Accelerator, cfg: RunConfig):
    """Where `run` builds the model: straight on the GPU when one process holds all of it (one GPU, DDP): random
    parts are initialised there and pretrained ones load there, with no full-size copy in host memory. Under
    DeepSpeed / FSDP (their own placement) and for a 4-bit LLM (bitsandbytes places it), on the host."""
    from contextlib import nullcontext

    if (accelerator.device.type != "cuda" or engine(accelerator) not in ("none", "ddp")
            or cfg.model.llm.quantization is not None):
        return nullcontext()
    return torch.device(accelerator.device)

