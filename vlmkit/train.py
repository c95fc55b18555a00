"""The one training loop: every stage (frozen parts, full fine-tune) runs through `train_stage`."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import checkpoint as ckpt
from . import precision as prec
from . import preempt
from .config import DataConfig, RunConfig, StageConfig, TrainConfig
from .data.conversation import IGNORE
from .data.dataset import ConversationDataset
from .data.processor import collate
from .distributed import destroy_at_exit
from .flops import FlopCounter, peak_flops
from .progress import Meter
from .stages import apply_stage, format_table, param_groups, validate_plan


def make_accelerator(cfg: TrainConfig, cpu: bool = False) -> Accelerator:
    """Accumulation is counted by the loop itself (full windows), not by the data loader's end."""
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cpu,
        log_with=cfg.log_with,
        project_dir=cfg.output_dir,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        # each epoch's order is a function of (seed, epoch): what makes a resumed run see the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    cpu_threads(acc)
    destroy_at_exit()  # the process group ends before Python finalizes (vlmkit/distributed.py says why)
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


def micro_batching(global_batch: int, per_device: int, world: int, stage: str = "") -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) that make up exactly `global_batch`.

    `per_device` is the largest micro-batch; on more processes than the global batch needs at that
    size, the micro-batch shrinks (e.g. global 32, per-device 32, 2 processes -> 16 x 2 x 1).
    """
    micro = min(per_device, global_batch // world) if world else per_device
    if micro < 1 or global_batch % (micro * world):
        raise ValueError(f"stage {stage}: global_batch_size {global_batch} cannot be split into "
                         f"per-device micro-batches of at most {per_device} over {world} process(es)")
    return micro, global_batch // (micro * world)


class BatchStream:
    """Endless micro-batches: epoch after epoch of a prepared loader, each epoch reshuffled as a function of
    (seed, epoch) (accelerate's seedable sampler). `position` is (epoch, batches of it consumed) on this
    process; a stream started at a position skips exactly those batches, by index (their samples are not
    loaded), so a resumed run draws the same batches an uninterrupted one would have drawn."""

    def __init__(self, loader, epoch: int = 0, offset: int = 0):
        if len(loader) == 0:
            raise ValueError("the data loader yields no batch (empty dataset?)")
        self.loader, self.epoch, self.offset = loader, epoch, offset
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(skip_first_batches(self.loader, self.offset) if self.offset else self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.offset = None, self.epoch + 1, 0
                continue
            self.offset += 1
            return batch

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch + 1, 0) if self.offset >= len(self.loader) else (self.epoch, self.offset)


def make_dataset(data: DataConfig, processor) -> ConversationDataset:
    """A stage's dataset: `data.path`'s samples through `processor` (a model's, or `vlmkit.model.build_processor`)."""
    return ConversationDataset(data.path, processor, data.image_folder, data.template, data.max_length,
                               data.on_bad_sample, data.max_image_pixels, data.max_aspect_ratio,
                               data.allow_absolute_image_paths)


def make_loader(dataset, data: DataConfig, batch_size: int, pad_id: int) -> DataLoader:
    """The training DataLoader of one process: shuffled micro-batches of `batch_size`, images decoded and tiled
    by the dataset in `data.num_workers` worker processes (kept across epochs), collated (padded or packed, as
    `data.pack` says) in the workers too. `benchmarks/data_throughput.py` measures this same loader."""
    # the loader's own generator: loading data never draws from (or disturbs) the global torch RNG
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator(),
                      num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                      collate_fn=partial(collate, pad_id=pad_id, pack=data.pack, max_tokens=data.pack_max_tokens))


def make_optimizer(accelerator: Accelerator, raw, stage: StageConfig, precision: str) -> torch.optim.Optimizer:
    """AdamW over the stage's parameter groups; under `bf16-master` over fp32 masters of the bf16 weights (made on
    the training device, so the model goes there first: accelerate's prepare would move it anyway)."""
    kw = dict(lr=stage.lr, betas=(0.9, 0.999), fused=accelerator.device.type == "cuda")
    if precision == "bf16-master":
        raw.to(accelerator.device)
        return prec.MasterAdamW(param_groups(raw, stage), **kw)
    return torch.optim.AdamW(param_groups(raw, stage), **kw)


COUNTS = ("labels", "tokens", "samples", "flops", "llm_flops")


def window_counts(accelerator: Accelerator, window: list[dict], flop_counter: FlopCounter) -> dict:
    """An optimizer step's trained targets, real tokens, samples and model FLOPs over every process: read from
    collate's plain-int counts (no device sync), then one all-reduce when there are several processes."""
    vals = [0.0] * len(COUNTS)
    for b in window:
        lengths = b["lengths"] if "lengths" in b else b["attention_mask"].sum(1).tolist()
        labels = b["num_labels"] if "num_labels" in b else int((b["labels"][:, 1:] != IGNORE).sum())
        tiles = 0 if b.get("pixel_values") is None else int(b["pixel_values"].shape[0])
        flops, llm_flops = flop_counter.step(lengths, tiles)
        for i, v in enumerate((labels, sum(lengths), len(b["ids"]), flops, llm_flops)):
            vals[i] += v
    if accelerator.num_processes > 1:
        vals = accelerator.reduce(torch.tensor(vals, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return dict(zip(COUNTS, vals))


def memory_report(accelerator: Accelerator, raw, opt) -> dict:
    """Peak device memory of the stage (GiB) and what its weights, gradients, fp32 master weights and optimizer
    states take; the rest of the peak is activations and workspace. CUDA only ({} elsewhere)."""
    if accelerator.device.type != "cuda":
        return {}
    def size(ts):
        return sum(t.numel() * t.element_size() for t in ts) / 2**30

    inner = getattr(opt, "optimizer", opt)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    try:
        states = size(t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    except AttributeError:  # an engine's optimizer that keeps its state elsewhere
        states = None
    rep = {"peak_gib": torch.cuda.max_memory_allocated(accelerator.device) / 2**30,
           "weights_gib": size(raw.parameters()), "grads_gib": size(trainable),
           "master_weights_gib": inner.master_bytes() / 2**30 if isinstance(inner, prec.MasterAdamW) else 0.0,
           "optimizer_states_gib": states}
    known = sum(v for k, v in rep.items() if k != "peak_gib" and v is not None)
    rep["activations_and_other_gib"] = max(0.0, rep["peak_gib"] - known)
    return {k: None if v is None else round(v, 2) for k, v in rep.items()}


def draw_window(stream: BatchStream, accum: int, skipped: list, stage: str, patience: int) -> list[dict]:
    """The next `accum` micro-batches that hold samples. A micro-batch whose samples were all skipped
    (on_bad_sample: skip) is replaced by the next one, so every process still makes exactly `accum`
    forward passes per step; its skipped samples are recorded in `skipped`."""
    window, empty = [], 0
    while len(window) < accum:
        b = next(stream)
        if stream.epoch == 0:  # each sample once: a later epoch meets the same bad samples again
            skipped += b.get("skipped", [])
        if "input_ids" in b:
            window.append(b)
            empty = 0
            continue
        empty += 1
        if empty > patience:
            raise RuntimeError(f"stage {stage}: {empty} micro-batches in a row had every sample skipped (a whole "
                               f"epoch): no usable data. First skipped: {skipped[:3]}")
    return window


def train_stage(accelerator: Accelerator, model, stage: StageConfig, dataset, log_dir: Path,
                step_offset: int = 0, log_every: int = 10, save_steps: int = 0, keep: int = 2,
                resume: dict | None = None, log_samples: bool = False, on_finish=None, precision: str = "fp32") -> dict:
    """Train `model` for one stage of the plan on `dataset`; returns the stage's metrics.

    With `save_steps`, a resumable checkpoint (model, optimizer, scheduler, RNG states, data position;
    see vlmkit.checkpoint) is saved every that many optimizer steps under
    log_dir/checkpoints/<stage>/checkpoint-<step>/, the newest `keep` kept. `resume`: {"dir", "state"} of
    such a checkpoint, whose weights the model already holds: the stage continues after its step.
    `on_finish(prepared_model, metrics)` runs on every process after the last step, before the engine is
    released: where `run` saves the stage's model (gathering ZeRO-3 / FSDP shards needs the engine).
    `precision`: the regime `vlmkit.precision.resolve` chose (bf16-master: the optimizer keeps fp32 masters).
    """
    raw = accelerator.unwrap_model(model)
    rows = apply_stage(raw, stage.train, stage.lr)
    accelerator.print(format_table(rows, f"\n== stage {stage.name}: lr {stage.lr:g}, "
                                         f"global batch {stage.global_batch_size} =="))
    if stage.gradient_checkpointing:
        flags = raw.enable_gradient_checkpointing(stage.gradient_checkpointing_every, stage.gradient_checkpointing_skip)
        if not all(flags):
            accelerator.print(f"gradient checkpointing: {sum(flags)} of {len(flags)} LLM decoder layers recomputed")
    if stage.compile:
        accelerator.print(f"compiled {raw.compile_decoder_layers()} LLM decoder layers (torch.compile, dynamic shapes)")
    if engine(accelerator) == "fsdp":
        refresh_fsdp_precision(raw)
    if shards_weights(accelerator) and (raw.adapters or any(p.mode == "lora" for p in stage.train.values())):
        raise NotImplementedError(f"stage {stage.name}: LoRA adapters with sharded weights (DeepSpeed ZeRO-3, FSDP) are "
                                  "not supported yet: use ZeRO-2 or DDP (recipes/accelerate/zero2.yaml, ddp.yaml)")

    world = accelerator.num_processes
    micro, accum = micro_batching(stage.global_batch_size, stage.per_device_batch_size, world, stage.name)
    per_step = micro * world
    accelerator.print(f"global batch {stage.global_batch_size} = {micro} per device x {world} process(es) "
                      f"x {accum} accumulation step(s)")
    loader = make_loader(dataset, stage.data, micro, raw.tokenizer.pad_token_id)
    n_batches = math.ceil(len(dataset) / per_step)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * n_batches / accum))

    opt = make_optimizer(accelerator, raw, stage, precision)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(stage.warmup_ratio * total), total)
    shape = {"stage": stage.name, "total": total, "world_size": world, "micro_batch": micro, "accum": accum,
             "samples": len(dataset)}
    state = resume["state"] if resume else None
    if state is not None:
        diff = {k: (state.get(k), v) for k, v in shape.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"resume: {resume['dir']} was written by a run with a different "
                             + ", ".join(f"{k} ({was} then, {now} now)" for k, (was, now) in diff.items())
                             + ": resume with the same settings, or start over (--no-resume / train.resume: never, "
                               "or another output_dir)")
        if engine(accelerator) not in ("deepspeed", "fsdp"):  # theirs is read back after prepare
            opt.load_state_dict(ckpt.load_optimizer_state(resume["dir"]))
        sched.load_state_dict(state["scheduler"])
    configure_engine(accelerator, micro, accum, stage.max_grad_norm, raw.llm.config.hidden_size)
    match_zero3_dtype(accelerator, raw)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if state is not None and engine(accelerator) in ("deepspeed", "fsdp"):
        accelerator.load_state(str(Path(resume["dir"]) / ckpt.ENGINE_DIR))  # sharded optimizer (+ weights)
    accelerator.step = 0
    model.train()
    # FSDP: accelerate clips DTensor shards correctly when given exactly the prepared model's parameters
    params = list(model.parameters()) if engine(accelerator) == "fsdp" else [p for p in model.parameters()
                                                                               if p.requires_grad]

    rank = accelerator.process_index
    stream = BatchStream(loader, *(state["positions"][rank] if state else (0, 0)))
    start = state["step"] if state else 0
    skipped: list[dict] = list(state["skipped"]) if state else []
    seen, tokens = (state["seen"], state["tokens"]) if state else (0, 0)
    last_good = resume["dir"] if resume else None
    if state is not None:  # last: nothing above may draw from the restored generators
        ckpt.set_rng_state(ckpt.load_rng_state(resume["dir"], rank))
    flop_counter = FlopCounter.for_model(raw).with_stage(raw)
    meter = Meter(total, start, peak=peak_flops(accelerator.device))
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    bar = tqdm(total=total, initial=start, desc=stage.name, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    log_path, samples_path = log_dir / "log.jsonl", log_dir / "samples.jsonl"
    t0 = time.perf_counter() - (state["seconds"] if state else 0.0)
    last = {}
    for step in range(start + 1, total + 1):
        window = draw_window(stream, accum, skipped, stage.name, len(loader))
        counts = window_counts(accelerator, window, flop_counter)  # every process's together
        n_items = int(counts["labels"])
        loss_sum = torch.zeros((), device=accelerator.device)
        ids = [i for b in window for i in b["ids"]]
        for k, b in enumerate(window):
            with accelerator.accumulate(model):
                loss = model(**b, num_items=n_items)
                loss_sum += loss.detach()
                if k == len(window) - 1:  # before the last backward: DeepSpeed updates the weights inside it
                    step_loss = float(accelerator.reduce(loss_sum, "sum"))
                    if not math.isfinite(step_loss):
                        numerical_fault(accelerator, stage.name, step, f"the loss is {step_loss}", ids, last_good)
                # accelerate divides by the accumulation steps (DeepSpeed by its gradient_accumulation_steps, set
                # to `accum` by configure_engine) and DDP / DeepSpeed / FSDP average over processes:
                # undo both so the update is the token mean over the whole global batch
                accelerator.backward(loss * accum * world)
        if stage.max_grad_norm > 0:
            # DeepSpeed clipped inside the last backward (its gradient_clipping) and reports the norm it saw
            grad_norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
            grad_norm = None if grad_norm is None else float(grad_norm)  # None: an engine that reports none
            if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:  # fp16's scaler skips such steps
                numerical_fault(accelerator, stage.name, step, f"the gradient norm is {float(grad_norm)}", ids,
                                last_good)
        opt.step()  # the loss was checked first: a NaN never reaches the weights
        opt.zero_grad(set_to_none=True)
        sched.step()
        seen += int(counts["samples"])
        tokens += int(counts["tokens"])
        meter.update(int(counts["samples"]), int(counts["tokens"]), counts["flops"], counts["llm_flops"])
        dt = time.perf_counter() - t0
        last = {"loss": step_loss, "lr": sched.get_last_lr()[0], **meter.rates(), "samples": seen, "tokens": tokens,
                "flops": meter.flops, "llm_flops": meter.llm_flops, "elapsed": round(dt, 4)}
        if stage.max_grad_norm > 0 and grad_norm is not None:
            last["grad_norm"] = grad_norm
        if step == total:  # the stage's last record says how it trained and what memory it took
            last.update(precision=precision, memory=memory_report(accelerator, raw, opt))
        bar.update(1)
        bar.set_postfix_str(meter.postfix(step_loss), refresh=False)
        if step % max(1, log_every) == 0 or step == total:
            accelerator.log({f"{stage.name}/{k}": v for k, v in last.items()}, step=step_offset + step)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"stage": stage.name, "step": step, **last}) + "\n")
        if log_samples:
            all_ids = gather_object([ids])  # [per process]
            if accelerator.is_main_process:
                with open(samples_path, "a") as f:
                    f.write(json.dumps({"stage": stage.name, "step": step, "ids": all_ids}) + "\n")
        stop = preempt.requested(accelerator)  # SIGTERM / SIGINT: a resumable checkpoint now, then stop
        if (stop or save_steps and step % save_steps == 0) and step < total:
            per_rank = gather_object([{"position": list(stream.position), "rng": ckpt.rng_state(), "skipped": skipped}])
            epoch, offset = per_rank[0]["position"]
            st = {"format": ckpt.FORMAT, **shape, "step": step, "epoch": epoch, "offset": offset,
                  "positions": [r["position"] for r in per_rank], "done": False,
                  "scheduler": sched.state_dict(), "skipped": ckpt.merge_skipped([r["skipped"] for r in per_rank]),
                  "seen": seen, "tokens": tokens, "seconds": time.perf_counter() - t0}
            last_good = save_checkpoint(accelerator, model, log_dir / "checkpoints" / stage.name / f"checkpoint-{step}",
                                        keep=keep, optimizer=opt, state=st, rng=[r["rng"] for r in per_rank])
        if stop and step < total:
            raise preempt.Preempted(stop, stage.name, step, last_good)
    bar.close()
    dt = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    metrics = {"stage": stage.name, "steps": total, "samples": seen, "seconds": round(dt, 2),
               "train_samples_per_second": seen / dt, "train_tokens_per_second": tokens / dt,
               "final_loss": last.get("loss"), "skipped": ckpt.merge_skipped(gather_object([skipped])),
               "precision": precision, "recent": meter.rates(),
               "memory": last.get("memory") or memory_report(accelerator, raw, opt)}
    if on_finish is not None:
        on_finish(model, metrics)
    accelerator.free_memory()
    return metrics


def numerical_fault(accelerator: Accelerator, stage: str, step: int, what: str, ids: list, last_good) -> None:
    """Stop the run on a NaN / inf before the optimizer applies it, naming the step and its samples."""
    all_ids = [i for part in gather_object([ids]) for i in part]
    keep = (f"The last good checkpoint, {last_good}, is kept intact; rerunning the same command continues "
            f"from it (change the cause first: learning rate, data, precision)." if last_good else
            "No checkpoint of this stage was saved yet (train.save_steps); rerunning the same command restarts "
            "the stage from its start.")
    raise FloatingPointError(f"stage {stage}: {what} at step {step} (samples {all_ids}); the weights were not "
                             f"updated with this step. {keep}")


def save_checkpoint(accelerator: Accelerator, model, path: Path, keep: int = 2, optimizer=None,
                    state: dict | None = None, rng: list | None = None) -> Path:
    """Save the model (+ optimizer state, trainer_state.json, RNG states when given) to a temporary folder,
    fsync, rename to `path`; then delete all but the newest `keep` checkpoints. A crash midway leaves the
    previous checkpoints whole and no partial `checkpoint-*` folder."""
    accelerator.wait_for_everyone()
    extra = {}
    if optimizer is not None and engine(accelerator) in ("deepspeed", "fsdp"):
        # sharded optimizer state: every process writes its part (accelerate's format) into a staging folder
        # that the main process moves into the checkpoint's temporary folder, so it appears with the rest
        staging = path.parent / f".{path.name}.engine"
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        extra[ckpt.ENGINE_DIR] = ckpt.move_writer(staging)
    elif optimizer is not None:
        extra[ckpt.OPTIMIZER_NAME] = ckpt.torch_writer(optimizer.state_dict())
    if state is not None:
        extra[ckpt.STATE_NAME] = ckpt.json_writer(state)
    if rng is not None:
        extra[ckpt.RNG_NAME] = ckpt.json_writer(rng, indent=None)
    save_model(accelerator, model, path, extra)
    if accelerator.is_main_process:
        ckpt.prune(path.parent, keep)
    accelerator.wait_for_everyone()
    return path


def save_model(accelerator: Accelerator, model, path: Path, extra_files: dict | None = None) -> None:
    """Write a prepared (or plain) model as a vlmkit model folder (config.json + model.safetensors with full
    tensors), atomically, from the main process only. Every process must call it: under ZeRO-3 / FSDP the
    weights are gathered from all of them first."""
    state = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path, extra_files=extra_files, weights=state)
    accelerator.wait_for_everyone()


def run(cfg: RunConfig, model=None, accelerator: Accelerator | None = None, cpu: bool = False) -> tuple:
    """Every stage of the plan in order, each starting from the previous one's weights.

    Saves each stage's model under output_dir/<stage name>/ and the final one under output_dir/model/.
    A run stopped midway continues where it stopped (train.resume, default auto): finished stages are
    not run again (the last one's model is loaded), a stage with a checkpoint continues after it with
    the same optimizer, scheduler, RNG and data position. Returns (model, accelerator, metrics per stage).
    """
    from .model import VLM
    from .security import user_trusts

    accelerator = accelerator or make_accelerator(cfg.train, cpu=cpu)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in cfg.stages]
    if accelerator.is_main_process:
        ckpt.clean_temporaries(out, names)
        if cfg.train.resume == "never":
            ckpt.forget(out, names)
    accelerator.wait_for_everyone()
    point = ckpt.find_resume(out, names, cfg.train.resume)
    if cfg.train.log_with:
        accelerator.init_trackers("vlmkit")
    regime = prec.resolve(cfg.train.precision, accelerator.mixed_precision, engine(accelerator),
                          quantized=cfg.model.llm.quantization is not None)
    dtype = prec.weight_dtype(regime)
    if model is None:
        with build_device(accelerator, cfg):
            model = VLM.from_config(cfg.model, dtype=dtype)
    elif dtype is not None:
        model.to(dtype)
    accelerator.print(f"precision: {regime}" + (f" ({prec.DESCRIPTION[regime]})" if regime in prec.DESCRIPTION else ""))
    for stage in cfg.stages:  # every plan checked before any training starts
        validate_plan(accelerator.unwrap_model(model), stage)
    if point is not None:
        accelerator.print(point.describe(names, out))
    if accelerator.is_main_process:  # records past the resume point (or of a start that saved nothing) go
        for log in ("log.jsonl", "samples.jsonl"):
            ckpt.truncate_log(out / log, names, point.stage_index if point else 0, point.step if point else 0)
    accelerator.wait_for_everyone()
    metrics = []
    step_offset = 0
    final_saved = False  # out/model written at the end of the last stage (sharded weights)
    for i, stage in enumerate(cfg.stages):
        raw = accelerator.unwrap_model(model)
        if point is not None and i < point.stage_index:  # finished before: not run again
            m = _read_metrics(out / stage.name, stage.name)
            step_offset += m.get("steps", 0)
            metrics.append(m)
            continue
        resume = None
        if point is not None and i == point.stage_index:
            if point.checkpoint is not None:
                raw.load_weights(point.checkpoint)
                resume = {"dir": point.checkpoint, "state": point.state}
            elif point.boundary_dir is not None:  # the stage starts from the previous one's model, with the RNG
                raw.load_weights(point.boundary_dir)  # where that one ended
                ckpt.set_rng_state(ckpt.load_rng_state(point.boundary_dir, accelerator.process_index))
        dataset = make_dataset(stage.data, raw.processor())
        last_stage = i == len(cfg.stages) - 1

        def finish(prepared, m, stage=stage, last_stage=last_stage):
            """The stage's folder (and, after the last stage with sharded weights, the final model), written
            while the engine can still gather ZeRO-3 / FSDP shards into full tensors."""
            nonlocal final_saved
            if not cfg.train.save_models:
                return
            final = {"format": ckpt.FORMAT, "stage": stage.name, "step": m["steps"], "done": True}
            rng = gather_object([ckpt.rng_state()])
            state = full_state_dict(accelerator, prepared)  # a collective: every process
            if accelerator.is_main_process:  # model, metrics and the done marker appear together or not at all
                raw = accelerator.unwrap_model(prepared)
                raw.save_pretrained(out / stage.name, weights=state,
                                    extra_files={ckpt.METRICS_NAME: ckpt.json_writer(m),
                                                 ckpt.STATE_NAME: ckpt.json_writer(final),
                                                 ckpt.RNG_NAME: ckpt.json_writer(rng, indent=None)})
                if last_stage and state is not None:
                    raw.save_pretrained(out / "model", weights=state)
            final_saved = last_stage and shards_weights(accelerator)  # the same answer on every process
            accelerator.wait_for_everyone()

        with ckpt.writing(out, "the run's output_dir"):  # a full disk names the folder it filled
            m = train_stage(accelerator, model, stage, dataset, out, step_offset, cfg.train.log_every,
                            cfg.train.save_steps, keep=cfg.train.keep_checkpoints, resume=resume,
                            log_samples=cfg.train.log_samples, on_finish=finish, precision=regime)
        model = accelerator.unwrap_model(model)
        step_offset += m["steps"]
        if m["skipped"]:
            accelerator.print(f"stage {stage.name}: skipped {len(m['skipped'])} bad sample(s); "
                              f"first: {m['skipped'][:3]}")
        metrics.append(m)
    whole = out / "model"  # where a sharded run's consolidated model is read back from
    if point is not None and point.stage_index >= len(cfg.stages):  # every stage was finished before
        model = accelerator.unwrap_model(model)
        if shards_weights(accelerator):  # built partitioned, never given to an engine: read back whole
            final_saved, whole = True, point.boundary_dir
        else:
            model.load_weights(point.boundary_dir)
    if final_saved:
        # ZeRO-3 / FSDP: the module keeps only this process's shards once the engine is released; every process
        # continues with the consolidated model (so generation, evaluation and export see whole weights)
        with plain_init():
            model = VLM.from_pretrained(whole, trust_remote_code=user_trusts(cfg.model)).to(accelerator.device)
        if whole != out / "model" and accelerator.is_main_process:
            model.save_pretrained(out / "model")
    elif accelerator.is_main_process and cfg.train.save_models:
        model.save_pretrained(out / "model")
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): that also destroys the process group, and the
        tracker.finish()                  # accelerator returned here must still synchronise (it ends at exit)
    return model, accelerator, metrics


def build_device(accelerator: Accelerator, cfg: RunConfig):
    """Where `run` builds the model: straight on the GPU when one process holds all of it (one GPU, DDP): random
    parts are initialised there and pretrained ones load there, with no full-size copy in host memory. Under
    DeepSpeed / FSDP (their own placement) and for a 4-bit LLM (bitsandbytes places it), on the host."""
    from contextlib import nullcontext

    if (accelerator.device.type != "cuda" or engine(accelerator) not in ("none", "ddp")
            or cfg.model.llm.quantization is not None):
        return nullcontext()
    return torch.device(accelerator.device)


def _read_metrics(folder: Path, stage: str) -> dict:
    try:
        with open(folder / ckpt.METRICS_NAME) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"stage": stage}
