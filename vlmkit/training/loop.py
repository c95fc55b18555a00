"""The one training loop: every stage (frozen parts, LoRA, full fine-tune) and every recipe trains through
`train_stage`.

It reads top to bottom: `plan_stage` (who trains) and `prepare_stage` (batch shape, loader, optimizer, engine,
resume) once; then per optimizer step `train_step` (forward / backward over the accumulation window, clip,
update), `record_step`, `log_step` and `checkpoint_step`; `finish_stage` at the end. Engine specifics live in
`engine.py`, batches in `batches.py`, checkpoint files in `checkpoint.py`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..config import StageConfig
from . import preempt
from .batches import BatchStream, batching_shape, dataset_size, draw_window, make_loader, window_counts
from .checkpoint import (ENGINE_DIR, FORMAT, load_optimizer_state, load_rng_state, merge_skipped, rng_state,
                         save_checkpoint, set_rng_state)
from .engine import configure_engine, engine, match_zero3_dtype, refresh_fsdp_precision, shards_weights
from .flops import FlopCounter, peak_flops
from .optim import make_optimizer, make_scheduler
from .precision import MasterWeights
from .progress import Meter
from .stages import apply_stage, format_table, param_groups


@dataclass
class StageRun:
    """One stage in flight: what `prepare_stage` made and what the steps carry on (into a checkpoint, too)."""
    stage: StageConfig
    model: Any  # as accelerate prepared it (a DDP / DeepSpeed / FSDP wrapper, or the VLM itself)
    raw: Any  # the VLM
    opt: Any
    sched: Any
    loader: Any
    params: list  # what clipping sees
    accum: int
    total: int
    shape: dict  # what a resumed run must match
    precision: str
    stream: BatchStream | None = None
    start: int = 0  # the last step already done (a resumed stage)
    skipped: list = field(default_factory=list)
    seen: int = 0
    tokens: int = 0
    last_good: Path | None = None  # the newest checkpoint of this stage
    t0: float = 0.0
    flop_counter: FlopCounter | None = None
    meter: Meter | None = None


def train_stage(accelerator: Accelerator, model, stage: StageConfig, dataset, log_dir: Path,
                step_offset: int = 0, log_every: int = 10, save_steps: int = 0, keep: int = 2,
                resume: dict | None = None, log_samples: bool = False, on_finish=None, precision: str = "fp32") -> dict:
    """Train `model` for one stage of the plan on `dataset`; returns the stage's metrics.

    With `save_steps`, a resumable checkpoint (model, optimizer, scheduler, RNG states, data position;
    see vlmkit.training.checkpoint) is saved every that many optimizer steps under
    log_dir/checkpoints/<stage>/checkpoint-<step>/, the newest `keep` kept. `resume`: {"dir", "state"} of
    such a checkpoint, whose weights the model already holds: the stage continues after its step.
    `on_finish(prepared_model, metrics)` runs on every process after the last step, before the engine is
    released: where `run` saves the stage's model (gathering ZeRO-3 / FSDP shards needs the engine).
    `precision`: the regime `vlmkit.training.precision.resolve` chose (bf16-master: the optimizer keeps fp32
    masters).
    """
    plan_stage(accelerator, accelerator.unwrap_model(model), stage)
    job = prepare_stage(accelerator, model, stage, dataset, resume, precision)
    bar = progress_bar(accelerator, job)
    last = {}
    for step in range(job.start + 1, job.total + 1):
        window = draw_window(job.stream, job.accum, job.skipped, stage.name, job.stream.patience)
        counts = window_counts(accelerator, window, job.flop_counter)  # every process's together
        ids = [i for b in window for i in b["ids"]]
        step_loss, grad_norm = train_step(accelerator, job, window, int(counts["labels"]), ids, step)
        last = record_step(accelerator, job, counts, step_loss, grad_norm, step)
        bar.update(1)
        bar.set_postfix_str(job.meter.postfix(step_loss), refresh=False)
        log_step(accelerator, job, step, last, ids, log_dir, step_offset, log_every, log_samples)
        checkpoint_step(accelerator, job, step, log_dir / "checkpoints" / stage.name, save_steps, keep)
    bar.close()
    return finish_stage(accelerator, job, last, on_finish)


# ---- prepare: once per stage ----

def plan_stage(accelerator: Accelerator, raw, stage: StageConfig) -> None:
    """Apply the stage's plan (which parts train, how) and its per-stage model switches; log the table."""
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


def prepare_stage(accelerator: Accelerator, model, stage: StageConfig, dataset, resume: dict | None,
                  precision: str) -> StageRun:
    """Batch shape, loader, optimizer and schedule (restored from `resume`), all prepared by the engine."""
    raw = accelerator.unwrap_model(model)
    world = accelerator.num_processes
    micro, accum = stage.micro_batching(world)
    accelerator.print(f"global batch {stage.global_batch_size} = {micro} per device x {world} process(es) "
                      f"x {accum} accumulation step(s)")
    loader = make_loader(dataset, stage.data, micro, raw.tokenizer.pad_token_id, accelerator.process_index, world)
    samples = dataset_size(dataset)  # None: a stream (its length is max_steps)
    total = stage.max_steps if samples is None else stage.total_steps(samples, world)
    opt = make_optimizer(accelerator, raw, stage, precision)
    sched = make_scheduler(opt, stage, total)
    shape = {"stage": stage.name, "total": total, "world_size": world, "micro_batch": micro, "accum": accum,
             "samples": samples, **batching_shape(stage.data)}
    state = resume["state"] if resume else None
    if state is not None:
        check_same_shape(resume, shape)
        if engine(accelerator) not in ("deepspeed", "fsdp"):  # theirs is read back after prepare
            opt.load_state_dict(load_optimizer_state(resume["dir"]))
        sched.load_state_dict(state["scheduler"])
    configure_engine(accelerator, micro, accum, stage.max_grad_norm, raw.llm.config.hidden_size)
    match_zero3_dtype(accelerator, raw)
    if getattr(loader, "shards_itself", False):  # each process's own batches already (streaming, grouped)
        model, opt = accelerator.prepare(model, opt)
    else:
        model, opt, loader = accelerator.prepare(model, opt, loader)
    if state is not None and engine(accelerator) in ("deepspeed", "fsdp"):
        accelerator.load_state(str(Path(resume["dir"]) / ENGINE_DIR))  # sharded optimizer (+ weights)
    accelerator.step = 0
    model.train()
    # FSDP: accelerate clips DTensor shards correctly when given exactly the prepared model's parameters
    params = list(model.parameters()) if engine(accelerator) == "fsdp" else [p for p in model.parameters()
                                                                               if p.requires_grad]
    job = StageRun(stage, model, raw, opt, sched, loader, params, accum, total, shape, precision)
    start_position(accelerator, job, resume)
    return job


def check_same_shape(resume: dict, shape: dict) -> None:
    """A checkpoint continues only a run of the same batch shape, data size and length."""
    state = resume["state"]
    diff = {k: (state.get(k), v) for k, v in shape.items() if state.get(k) != v}
    if diff:
        raise ValueError(f"resume: {resume['dir']} was written by a run with a different "
                         + ", ".join(f"{k} ({was} then, {now} now)" for k, (was, now) in diff.items())
                         + ": resume with the same settings, or start over (--no-resume / train.resume: never, "
                           "or another output_dir)")


def start_position(accelerator: Accelerator, job: StageRun, resume: dict | None) -> None:
    """Where the stage's steps start: the data position, counts and RNG states of `resume`, or the beginning."""
    state = resume["state"] if resume else None
    rank = accelerator.process_index
    job.stream = BatchStream(job.loader, *(state["positions"][rank] if state else (0, 0)),
                             device=accelerator.device if getattr(job.loader, "shards_itself", False) else None)
    job.start = state["step"] if state else 0
    job.skipped = list(state["skipped"]) if state else []
    job.seen, job.tokens = (state["seen"], state["tokens"]) if state else (0, 0)
    job.last_good = resume["dir"] if resume else None
    if state is not None:  # last: nothing above may draw from the restored generators
        set_rng_state(load_rng_state(resume["dir"], rank))
    job.flop_counter = FlopCounter.for_model(job.raw).with_stage(job.raw)
    job.meter = Meter(job.total, job.start, peak=peak_flops(accelerator.device))
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    job.t0 = time.perf_counter() - (state["seconds"] if state else 0.0)


def progress_bar(accelerator: Accelerator, job: StageRun) -> tqdm:
    return tqdm(total=job.total, initial=job.start, desc=job.stage.name, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")


# ---- step: once per optimizer step ----

def train_step(accelerator: Accelerator, job: StageRun, window: list[dict], n_items: int, ids: list,
               step: int) -> tuple[float, float | None]:
    """Forward and backward over the window's micro-batches, clip, update; (loss of the global batch, gradient
    norm or None). A NaN / inf loss or gradient norm stops the run before the optimizer applies it."""
    model, world = job.model, accelerator.num_processes
    loss_sum = torch.zeros((), device=accelerator.device)
    for k, b in enumerate(window):
        with accelerator.accumulate(model):
            loss = model(**b, num_items=n_items)
            loss_sum += loss.detach()
            if k == len(window) - 1:  # before the last backward: DeepSpeed updates the weights inside it
                step_loss = float(accelerator.reduce(loss_sum, "sum"))
                if not math.isfinite(step_loss):
                    numerical_fault(accelerator, job.stage.name, step, f"the loss is {step_loss}", ids, job.last_good)
            # accelerate divides by the accumulation steps (DeepSpeed by its gradient_accumulation_steps, set
            # to `accum` by configure_engine) and DDP / DeepSpeed / FSDP average over processes:
            # undo both so the update is the token mean over the whole global batch
            accelerator.backward(loss * job.accum * world)
    grad_norm = None
    if job.stage.max_grad_norm > 0:
        # DeepSpeed clipped inside the last backward (its gradient_clipping) and reports the norm it saw
        grad_norm = accelerator.clip_grad_norm_(job.params, job.stage.max_grad_norm)
        grad_norm = None if grad_norm is None else float(grad_norm)  # None: an engine that reports none
        if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:  # fp16's scaler skips such steps
            numerical_fault(accelerator, job.stage.name, step, f"the gradient norm is {float(grad_norm)}", ids,
                            job.last_good)
    job.opt.step()  # the loss was checked first: a NaN never reaches the weights
    job.opt.zero_grad(set_to_none=True)
    job.sched.step()
    return step_loss, grad_norm


def numerical_fault(accelerator: Accelerator, stage: str, step: int, what: str, ids: list, last_good) -> None:
    """Stop the run on a NaN / inf before the optimizer applies it, naming the step and its samples."""
    all_ids = [i for part in gather_object([ids]) for i in part]
    keep = (f"The last good checkpoint, {last_good}, is kept intact; rerunning the same command continues "
            f"from it (change the cause first: learning rate, data, precision)." if last_good else
            "No checkpoint of this stage was saved yet (train.save_steps); rerunning the same command restarts "
            "the stage from its start.")
    raise FloatingPointError(f"stage {stage}: {what} at step {step} (samples {all_ids}); the weights were not "
                             f"updated with this step. {keep}")


# ---- log and checkpoint: after each step ----

def record_step(accelerator: Accelerator, job: StageRun, counts: dict, step_loss: float, grad_norm: float | None,
                step: int) -> dict:
    """Add the step to the stage's counts; the step's log record."""
    job.seen += int(counts["samples"])
    job.tokens += int(counts["tokens"])
    job.meter.update(int(counts["samples"]), int(counts["tokens"]), counts["flops"], counts["llm_flops"])
    dt = time.perf_counter() - job.t0
    last = {"loss": step_loss, "lr": job.sched.get_last_lr()[0], **job.meter.rates(), "samples": job.seen,
            "tokens": job.tokens, "flops": job.meter.flops, "llm_flops": job.meter.llm_flops, "elapsed": round(dt, 4)}
    if grad_norm is not None:  # None: no clipping (max_grad_norm 0) or an engine that reports no norm
        last["grad_norm"] = grad_norm
    if step == job.total:  # the stage's last record says how it trained and what memory it took
        last.update(precision=job.precision, memory=memory_report(accelerator, job.raw, job.opt))
    return last


def log_step(accelerator: Accelerator, job: StageRun, step: int, last: dict, ids: list, log_dir: Path,
             step_offset: int, log_every: int, log_samples: bool) -> None:
    """Every `log_every` steps (and the last): the record to the trackers and log_dir/log.jsonl; with
    `log_samples`, every step's sample ids of all processes to log_dir/samples.jsonl."""
    name = job.stage.name
    if step % max(1, log_every) == 0 or step == job.total:
        accelerator.log({f"{name}/{k}": v for k, v in last.items()}, step=step_offset + step)
        if accelerator.is_main_process:
            with open(log_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"stage": name, "step": step, **last}) + "\n")
    if log_samples:
        all_ids = gather_object([ids])  # [per process]
        if accelerator.is_main_process:
            with open(log_dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"stage": name, "step": step, "ids": all_ids}) + "\n")


def checkpoint_step(accelerator: Accelerator, job: StageRun, step: int, folder: Path, save_steps: int,
                    keep: int) -> None:
    """Every `save_steps` steps, and on SIGTERM / SIGINT (then stop: preempt.Preempted), a resumable checkpoint
    `folder/checkpoint-<step>` (the stage's last step is saved by `run` as the stage's model instead)."""
    stop = preempt.requested(accelerator)
    if (stop or save_steps and step % save_steps == 0) and step < job.total:
        per_rank = gather_object([{"position": list(job.stream.position), "rng": rng_state(), "skipped": job.skipped}])
        epoch, offset = per_rank[0]["position"]
        st = {"format": FORMAT, **job.shape, "step": step, "epoch": epoch, "offset": offset,
              "positions": [r["position"] for r in per_rank], "done": False,
              "scheduler": job.sched.state_dict(), "skipped": merge_skipped([r["skipped"] for r in per_rank]),
              "seen": job.seen, "tokens": job.tokens, "seconds": time.perf_counter() - job.t0}
        job.last_good = save_checkpoint(accelerator, job.model, folder / f"checkpoint-{step}", keep=keep,
                                        optimizer=job.opt, state=st, rng=[r["rng"] for r in per_rank])
    if stop and step < job.total:
        raise preempt.Preempted(stop, job.stage.name, step, job.last_good)


def finish_stage(accelerator: Accelerator, job: StageRun, last: dict, on_finish) -> dict:
    """The stage's metrics (every process's counts together); `on_finish` while the engine still holds the model."""
    dt = time.perf_counter() - job.t0
    accelerator.wait_for_everyone()
    metrics = {"stage": job.stage.name, "steps": job.total, "samples": job.seen, "seconds": round(dt, 2),
               "train_samples_per_second": job.seen / dt, "train_tokens_per_second": job.tokens / dt,
               "final_loss": last.get("loss"), "skipped": merge_skipped(gather_object([job.skipped])),
               "precision": job.precision, "recent": job.meter.rates(),
               "memory": last.get("memory") or memory_report(accelerator, job.raw, job.opt)}
    if on_finish is not None:
        on_finish(job.model, metrics)
    accelerator.free_memory()
    return metrics


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
           "master_weights_gib": inner.master_bytes() / 2**30 if isinstance(inner, MasterWeights) else 0.0,
           "optimizer_states_gib": states}
    known = sum(v for k, v in rep.items() if k != "peak_gib" and v is not None)
    rep["activations_and_other_gib"] = max(0.0, rep["peak_gib"] - known)
    return {k: None if v is None else round(v, 2) for k, v in rep.items()}
