"""The high-resolution demos' comparison: a tiled run against the same run with one tile per image.

recipes/llava_next.py (AnyRes) and recipes/internvl.py (InternVL dynamic tiling) share it: the demo
data and tokenizer are written once, the tiled model trains, then the same config with tiling reduced
to one tile (same encoder, connector, LLM, data, stage plan and seed) trains under `single_tile/`, and
both are evaluated on the same held-out questions, per type.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ..config import RunConfig, TilingConfig
from ..training.run import run
from .metrics import demo_metrics


def single_tile(cfg: RunConfig, out: Path) -> RunConfig:
    """`cfg` with one tile per image (no tiling: the encoder's `image_aspect`, by default LLaVA-1.5's pad to
    a square + resize; no image_newline, so it leaves the plans), written under out/single_tile.

    Not InternVL's own single tile (max_tiles 1: a plain resize to the tile, aspect not kept): on a 2:1
    canvas that halves one axis only, and detail along the other would survive.
    """
    cfg = copy.deepcopy(cfg)
    if cfg.model.tiling is None or cfg.model.tiling.mode == "none":
        raise ValueError("single_tile: the config has no tiling (model.tiling.mode none) to compare with")
    cfg.model.tiling = TilingConfig()
    for s in cfg.stages:
        s.train.pop("image_newline", None)
    cfg.train.output_dir = str(out / "single_tile")
    cfg.train.log_with = None
    return cfg


def run_demo(cfg: RunConfig, out: Path, accelerator, compare: bool = True, t0: float | None = None) -> dict | None:
    """Train `cfg` (a demo whose data already sits under out/data), and with `compare` the single-tile
    variant; returns the metrics (None on processes other than the main one), also written to
    out/metrics.json: demo_metrics of the tiled model plus `single_tile` (its own demo_metrics) and
    `eval_accuracy_single_tile[_per_type]`. `t0`: when the demo started (wall_seconds counts from it; default now)."""
    eval_path = str(out / "data" / "eval.json")
    t0 = time.perf_counter() if t0 is None else t0
    model, accelerator, stages = run(cfg, accelerator=accelerator)
    metrics = demo_metrics(model, eval_path, stages, t0) if accelerator.is_main_process else None  # tiled
    if compare:
        t1 = time.perf_counter()
        base, _, base_stages = run(single_tile(cfg, out), accelerator=accelerator)
        if accelerator.is_main_process:
            single = demo_metrics(base, eval_path, base_stages, t1)
            metrics.update(single_tile=single, eval_accuracy_single_tile=single["eval_accuracy"],
                           eval_accuracy_single_tile_per_type=single["eval_accuracy_per_type"])
    if not accelerator.is_main_process:
        return None
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def report(metrics: dict, out: Path, label: str) -> None:
    """Print a demo's headline figures: overall and per-type accuracy, tiled and single tile."""
    keys = ("eval_accuracy", "eval_accuracy_single_tile", "eval_accuracy_no_image", "wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    print(f"{label} per type: {metrics['eval_accuracy_per_type']}")
    if "single_tile" in metrics:
        print(f"single tile per type: {metrics['eval_accuracy_single_tile_per_type']}")
    print(f"model: {out / 'model'}  metrics: {out / 'metrics.json'}")


def main(argv, doc: str, demo_config: Path, label: str) -> None:
    """A high-resolution recipe's command line (recipes/llava_next.py, recipes/internvl.py): `--config` trains
    that run config; without it, the embedded demo (data written under the output dir, the tiled model
    trained and, unless --no-compare-single-tile, the same model with one tile; both reported)."""
    from ..config import add_override_args, add_resume_args, apply_run_args, load_config, parse_run_args
    from ..training.engine import make_accelerator
    from .demo import relocate
    from .demo_highres import prepare

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a run config (YAML); default: the embedded demo")
    ap.add_argument("--output-dir", default=None, help="override train.output_dir")
    ap.add_argument("--cpu", action="store_true", help="force CPU (e.g. a 2-process gloo run)")
    ap.add_argument("--demo-train-images", type=int, default=2000)
    ap.add_argument("--demo-eval-images", type=int, default=120, help="demo: held-out images (3 questions each)")
    ap.add_argument("--compare-single-tile", action=argparse.BooleanOptionalAction, default=True,
                    help="demo: also train with one tile per image and report both accuracies (default: on)")
    add_resume_args(ap)
    add_override_args(ap)
    args = parse_run_args(ap, argv)

    demo = args.config is None
    cfg = load_config(args.config or demo_config, args.overrides)
    apply_run_args(cfg.train, args)
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train, cpu=args.cpu)
    if not demo:
        run(cfg, accelerator=accelerator)
        return
    relocate(cfg, out)  # the demo writes its data and tokenizer under the chosen output dir
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        prepare(out, args.demo_train_images, args.demo_eval_images)
    accelerator.wait_for_everyone()
    metrics = run_demo(cfg, out, accelerator, compare=args.compare_single_tile, t0=t0)
    if metrics is not None:
        report(metrics, out, label)
