"""The high-resolution demos' comparison: a tiled run against the same run with one tile per image.

recipes/llava_next.py (AnyRes) and recipes/internvl.py (InternVL dynamic tiling) share it: the demo
data and tokenizer are written once, the tiled model trains, then the same config with tiling reduced
to one tile (same encoder, connector, LLM, data, stage plan and seed) trains under `single_tile/`, and
both are evaluated on the same held-out questions, per type.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from .config import RunConfig, TilingConfig
from .evaluate import demo_metrics
from .train import run


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
