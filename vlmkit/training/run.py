"""A run: every stage of the plan in order through the one loop (`loop.train_stage`), continuing a run that
was stopped where it stopped. Reads top to bottom: `start_run` (trackers, output folder, resume point), `prepare_model`
(precision, build, plans checked), then per stage `stage_start` (weights / RNG of a resumed stage) and
`stage_saver` (its model folder), and `final_model` (output_dir/model)."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from ..config import RunConfig, save_config
from . import checkpoint as ckpt
from . import loop
from . import trackers
from . import precision as prec
from .batches import make_dataset
from .optim import check_stages
from .engine import build_device, engine, full_state_dict, make_accelerator, plain_init, shards_weights
from .stages import validate_plan
from .summary import summary


def run(cfg: RunConfig, model=None, accelerator: Accelerator | None = None, cpu: bool = False) -> tuple:
    """Every stage of the plan in order, each starting from the previous one's weights.

    Saves each stage's model under output_dir/<stage name>/ and the final one under output_dir/model/.
    A run stopped midway continues where it stopped (train.resume, default auto): finished stages are
    not run again (the last one's model is loaded), a stage with a checkpoint continues after it with
    the same optimizer, scheduler, RNG and data position. Returns (model, accelerator, metrics per stage).
    """
    accelerator = accelerator or make_accelerator(cfg.train, cpu=cpu)
    regime = prec.resolve(cfg.train.precision, accelerator.mixed_precision, engine(accelerator),
                          quantized=cfg.model.llm.quantization is not None)
    check_stages(cfg.stages, accelerator.device.type, regime)  # optimizers and schedules, before anything is written
    out, point = start_run(cfg, accelerator)
    model = prepare_model(cfg, accelerator, model, point, out, regime)
    metrics = []
    step_offset = 0
    saved = {"final": False}  # out/model written at the end of the last stage (sharded weights)
    for i, stage in enumerate(cfg.stages):
        if point is not None and i < point.stage_index:  # finished before: not run again
            m = _read_metrics(out / stage.name, stage.name)
            step_offset += m.get("steps", 0)
            metrics.append(m)
            continue
        raw = accelerator.unwrap_model(model)
        resume = stage_start(accelerator, raw, point, i)
        dataset = make_dataset(stage.data, raw.processor())
        finish = stage_saver(cfg, accelerator, out, stage, i == len(cfg.stages) - 1, saved)
        with ckpt.writing(out, "the run's output_dir"):  # a full disk names the folder it filled
            m = loop.train_stage(accelerator, model, stage, dataset, out, step_offset, cfg.train.log_every,
                                 cfg.train.save_steps, keep=cfg.train.keep_checkpoints, resume=resume,
                                 log_samples=cfg.train.log_samples, on_finish=finish, precision=regime)
        model = accelerator.unwrap_model(model)
        step_offset += m["steps"]
        if m["skipped"]:
            accelerator.print(f"stage {stage.name}: skipped {len(m['skipped'])} bad sample(s); "
                              f"first: {m['skipped'][:3]}")
        metrics.append(m)
    model = final_model(cfg, accelerator, model, out, point, saved["final"])
    trackers.finish(accelerator)  # not end_training(): the accelerator returned here must still synchronise
    accelerator.print(summary(metrics, out, cfg.train.save_models), end="")
    return model, accelerator, metrics


def start_run(cfg: RunConfig, accelerator: Accelerator) -> tuple[Path, ckpt.ResumePoint | None]:
    """Seed, output folder (half-written temporaries removed; everything removed under resume: never) and the
    point a stopped run continues from (None: from the start)."""
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trackers.start(accelerator, cfg)  # one that cannot start stops the run here: nothing in `out` changed yet
    names = [s.name for s in cfg.stages]
    if accelerator.is_main_process:
        ckpt.clean_temporaries(out, names)
        if cfg.train.resume == "never":
            ckpt.forget(out, names)
    accelerator.wait_for_everyone()
    point = ckpt.find_resume(out, names, cfg.train.resume)
    if accelerator.is_main_process:  # the resolved config (after overrides): what this run trained with
        save_config(cfg, out / "config.yaml")
    return out, point


def prepare_model(cfg: RunConfig, accelerator: Accelerator, model, point, out: Path, regime: str):
    """The model in the precision regime's weight dtype; every stage's plan checked before any training starts;
    the logs cut back to the resume point."""
    from ..models.vlm import VLM

    dtype = prec.weight_dtype(regime)
    if model is None:
        with build_device(accelerator, cfg):
            model = VLM.from_config(cfg.model, dtype=dtype)
    elif dtype is not None:
        model.to(dtype)
    accelerator.print(f"precision: {regime}" + (f" ({prec.DESCRIPTION[regime]})" if regime in prec.DESCRIPTION else ""))
    for stage in cfg.stages:  # every plan checked before any training starts
        validate_plan(accelerator.unwrap_model(model), stage)
    names = [s.name for s in cfg.stages]
    if point is not None:
        accelerator.print(point.describe(names, out))
    if accelerator.is_main_process:  # records past the resume point (or of a start that saved nothing) go
        for log in ("log.jsonl", "samples.jsonl"):
            ckpt.truncate_log(out / log, names, point.stage_index if point else 0, point.step if point else 0)
    accelerator.wait_for_everyone()
    return model


def stage_start(accelerator: Accelerator, raw, point, i: int) -> dict | None:
    """Stage `i` of a resumed run: load its checkpoint (returned as {"dir", "state"} for the loop) or the previous
    stage's model and the RNG states where that one ended. None for a stage that starts plainly."""
    if point is None or i != point.stage_index:
        return None
    if point.checkpoint is not None:
        raw.load_weights(point.checkpoint)
        return {"dir": point.checkpoint, "state": point.state}
    if point.boundary_dir is not None:  # the stage starts from the previous one's model, with the RNG
        raw.load_weights(point.boundary_dir)  # where that one ended
        ckpt.set_rng_state(ckpt.load_rng_state(point.boundary_dir, accelerator.process_index))
    return None


def stage_saver(cfg: RunConfig, accelerator: Accelerator, out: Path, stage, last_stage: bool, saved: dict):
    """The loop's `on_finish` for `stage`: write the stage's folder (and, after the last stage with sharded
    weights, the final model) while the engine can still gather ZeRO-3 / FSDP shards into full tensors.
    Sets saved["final"] when out/model was written that way."""
    def finish(prepared, m):
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
        saved["final"] = last_stage and shards_weights(accelerator)  # the same answer on every process
        accelerator.wait_for_everyone()

    return finish


def final_model(cfg: RunConfig, accelerator: Accelerator, model, out: Path, point, final_saved: bool):
    """The run's model, whole on every process, written to out/model (unless the last stage wrote it already)."""
    from ..models.vlm import VLM
    from ..security import user_trusts

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
    return model


def _read_metrics(folder: Path, stage: str) -> dict:
    try:
        with open(folder / ckpt.METRICS_NAME) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"stage": stage}
