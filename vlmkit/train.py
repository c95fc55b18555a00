"""The one training loop: every stage (frozen parts, full fine-tune) runs through `train_stage`."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import RunConfig, StageConfig, TrainConfig
from .data.dataset import ConversationDataset
from .data.processor import collate
from .stages import apply_stage, format_table, param_groups, validate_plan


def make_accelerator(cfg: TrainConfig, cpu: bool = False) -> Accelerator:
    """Accumulation is counted by the loop itself (full windows), not by the data loader's end."""
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cpu,
        log_with=cfg.log_with,
        project_dir=cfg.output_dir,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


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


def batches_forever(loader):
    """Cycle the loader, reshuffling (seeded) at each epoch."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_stage(accelerator: Accelerator, model, stage: StageConfig, dataset, log_dir: Path,
                step_offset: int = 0, log_every: int = 10, save_steps: int = 0) -> dict:
    """Train `model` for one stage of the plan on `dataset`; returns the stage's metrics.

    With `save_steps`, the model is saved every that many optimizer steps under
    log_dir/checkpoints/<stage>/checkpoint-<step>/ (safetensors + config + tokenizer), the last two kept.
    """
    raw = accelerator.unwrap_model(model)
    rows = apply_stage(raw, stage.train, stage.lr)
    accelerator.print(format_table(rows, f"\n== stage {stage.name}: lr {stage.lr:g}, "
                                         f"global batch {stage.global_batch_size} =="))
    if stage.gradient_checkpointing:
        raw.enable_gradient_checkpointing()

    world = accelerator.num_processes
    micro, accum = micro_batching(stage.global_batch_size, stage.per_device_batch_size, world, stage.name)
    per_step = micro * world
    accelerator.print(f"global batch {stage.global_batch_size} = {micro} per device x {world} process(es) "
                      f"x {accum} accumulation step(s)")
    loader = DataLoader(dataset, batch_size=micro, shuffle=True,
                        num_workers=stage.data.num_workers, persistent_workers=stage.data.num_workers > 0,
                        collate_fn=partial(collate, pad_id=raw.tokenizer.pad_token_id))
    n_batches = math.ceil(len(dataset) / per_step)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * n_batches / accum))

    opt = torch.optim.AdamW(param_groups(raw, stage), lr=stage.lr, betas=(0.9, 0.999),
                            fused=accelerator.device.type == "cuda")
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(stage.warmup_ratio * total), total)
    accelerator.gradient_accumulation_steps = accum
    model, opt, loader = accelerator.prepare(model, opt, loader)
    accelerator.step = 0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    stream = batches_forever(loader)
    bar = tqdm(total=total, desc=stage.name, disable=not accelerator.is_local_main_process, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15)
    log_path = log_dir / "log.jsonl"
    skipped: list[dict] = []
    seen = tokens = 0
    t0 = time.perf_counter()
    last = {}
    for step in range(1, total + 1):
        window = [next(stream) for _ in range(accum)]
        for b in window:
            skipped += b.get("skipped", [])
            if "input_ids" not in b:
                raise RuntimeError(f"stage {stage.name}: every sample of a micro-batch was skipped: {b['skipped']}")
        local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        n_items = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
        loss_sum = torch.zeros((), device=accelerator.device)
        for b in window:
            with accelerator.accumulate(model):
                loss = model(**b, num_items=n_items)
                # accelerate divides by the accumulation steps and DDP averages over processes:
                # undo both so the update is the token mean over the whole global batch
                accelerator.backward(loss * accum * world)
                if accelerator.sync_gradients and stage.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        sched.step()
        step_loss = float(accelerator.reduce(loss_sum, "sum"))
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"stage {stage.name}: loss is {step_loss} at step {step} "
                                     f"(samples {[i for b in window for i in b['ids']]})")
        seen += sum(len(b["ids"]) for b in window) * world
        tokens += int(accelerator.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in window),
                                                      device=accelerator.device), "sum"))
        dt = time.perf_counter() - t0
        last = {"loss": step_loss, "lr": sched.get_last_lr()[0], "samples_per_second": seen / dt,
                "tokens_per_second": tokens / dt}
        if stage.max_grad_norm > 0:
            last["grad_norm"] = float(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{seen / dt:.1f}", tok_s=f"{tokens / dt:.0f}", refresh=False)
        if step % max(1, log_every) == 0 or step == total:
            accelerator.log({f"{stage.name}/{k}": v for k, v in last.items()}, step=step_offset + step)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"stage": stage.name, "step": step, **last}) + "\n")
        if save_steps and step % save_steps == 0 and step < total:
            save_checkpoint(accelerator, model, log_dir / "checkpoints" / stage.name / f"checkpoint-{step}", keep=2)
    bar.close()
    dt = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return {"stage": stage.name, "steps": total, "samples": seen, "seconds": round(dt, 2),
            "train_samples_per_second": seen / dt, "train_tokens_per_second": tokens / dt,
            "final_loss": last.get("loss"), "skipped": skipped}


def save_checkpoint(accelerator: Accelerator, model, path: Path, keep: int = 2) -> None:
    """Save the model (written to a temporary folder, then renamed); keep the newest `keep` checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path)
        ckpts = sorted(path.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def run(cfg: RunConfig, model=None, accelerator: Accelerator | None = None, cpu: bool = False) -> tuple:
    """Every stage of the plan in order, each starting from the previous one's weights.

    Saves each stage's model under output_dir/<stage name>/ and the final one under
    output_dir/model/. Returns (model, accelerator, metrics per stage).
    """
    from .model import VLM

    accelerator = accelerator or make_accelerator(cfg.train, cpu=cpu)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.log_with:
        accelerator.init_trackers("vlmkit")
    model = model if model is not None else VLM.from_config(cfg.model)
    for stage in cfg.stages:  # every plan checked before any training starts
        validate_plan(accelerator.unwrap_model(model), stage)
    metrics = []
    step_offset = 0
    for stage in cfg.stages:
        raw = accelerator.unwrap_model(model)
        data = stage.data
        dataset = ConversationDataset(data.path, raw.processor(), data.image_folder, data.template,
                                      data.max_length, data.on_bad_sample, data.max_image_pixels)
        m = train_stage(accelerator, model, stage, dataset, out, step_offset, cfg.train.log_every,
                        cfg.train.save_steps)
        model = accelerator.unwrap_model(model)
        step_offset += m["steps"]
        if m["skipped"]:
            accelerator.print(f"stage {stage.name}: skipped {len(m['skipped'])} bad sample(s); "
                              f"first: {m['skipped'][:3]}")
        if accelerator.is_main_process:
            model.save_pretrained(out / stage.name)
            with open(out / stage.name / "metrics.json", "w") as f:
                json.dump(m, f, indent=2)
        accelerator.wait_for_everyone()
        metrics.append(m)
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    accelerator.wait_for_everyone()
    if cfg.train.log_with:
        accelerator.end_training()
    return model, accelerator, metrics
