"""Ablations: the same stage plan for several (encoder, connector) pairs, ending in one table and one plot.

An ablation file names a base run config and the parts it swaps in:

    base: llava15_demo.yaml          # a run config (relative to this file): model, stages, train
    output_dir: runs/ablation
    demo: {train_images: 12000}      # optional: write the embedded demo's data and tokenizer first
    eval_data: runs/ablation/data/eval.json   # LLaVA-format questions with reference answers
    encoders:   {clip: {name: clip, config: {...}}, dinov2: {...}, ...}   # EncoderConfig mappings
    connectors: {mlp2x_gelu: {name: mlp2x_gelu}, ...}                    # ConnectorConfig mappings
    presets:    {encoders: {encoders: [clip, dinov2], connectors: [mlp2x_gelu]}, ...}
    preset: encoders                 # the selection a plain run makes

Each pair trains through `vlmkit.training.run.run` in `output_dir/<encoder>__<connector>/` and is evaluated
with real and with blank images (`vlmkit.experiments.metrics.demo_metrics`). A pair whose folder already holds a
result for the same configuration is reused; a pair stopped midway resumes; a pair whose configuration
changed starts over. At the end `ablation.csv`, `ablation.md` and `ablation.png` are written.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import (ConfigError, ConnectorConfig, EncoderConfig, RunConfig, from_dict, load_config, read_yaml,
                     to_dict)
from ..extras import require

RESULT_NAME = "ablation_result.json"
CONFIG_NAME = "ablation_config.json"
COLUMNS = ("encoder", "connector", "image_tokens", "trainable_params", "eval_accuracy",
           "eval_accuracy_no_image", "train_samples_per_second", "peak_memory_mib")
HEADERS = {
    "encoder": "encoder", "connector": "connector", "image_tokens": "image tokens / sample",
    "trainable_params": "trainable params", "eval_accuracy": "eval accuracy",
    "eval_accuracy_no_image": "accuracy, blank images", "train_samples_per_second": "train samples/s",
    "peak_memory_mib": "peak memory (MiB)",
}


@dataclass
class AblationConfig:
    base: str
    """The run config every pair starts from (its model's encoder and connector are replaced)."""
    encoders: dict[str, dict[str, Any]]
    """Name -> EncoderConfig mapping."""
    connectors: dict[str, dict[str, Any]]
    """Name -> ConnectorConfig mapping."""
    output_dir: str = "runs/ablation"
    eval_data: str = ""
    """LLaVA-format questions with reference answers; relative paths are taken as they are (cwd)."""
    demo: dict[str, Any] | None = None
    """{train_images: N}: write the demo's data and tokenizer under output_dir and point the base at them."""
    presets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    preset: str | None = None

    def __post_init__(self):
        for kind, table, cls in (("encoder", self.encoders, EncoderConfig), ("connector", self.connectors,
                                                                             ConnectorConfig)):
            for name, value in table.items():
                if "__" in name or "/" in name:
                    raise ConfigError(f"ablation {kind} name {name!r}: no '__' or '/' (it names a folder)")
                from_dict(cls, value, f"ablation.{kind}s.{name}")  # a typo fails now, not after hours
        for name, sel in self.presets.items():
            self.select(sel.get("encoders"), sel.get("connectors"), where=f"preset {name!r}")
        if self.preset is not None and self.preset not in self.presets:
            raise ConfigError(f"ablation preset {self.preset!r} is not among the presets {sorted(self.presets)}")

    def select(self, encoders=None, connectors=None, preset: str | None = None,
               where: str = "selection") -> list[tuple[str, str]]:
        """(encoder, connector) pairs: explicit names win, then the preset's, then everything listed."""
        chosen = self.presets.get(preset or self.preset or "", {})
        encs = list(encoders or chosen.get("encoders") or self.encoders)
        conns = list(connectors or chosen.get("connectors") or self.connectors)
        for kind, names, table in (("encoder", encs, self.encoders), ("connector", conns, self.connectors)):
            unknown = [n for n in names if n not in table]
            if unknown:
                raise ConfigError(f"{where}: unknown {kind}(s) {unknown}; this ablation lists {sorted(table)}")
        return [(e, c) for e in encs for c in conns]


def load_ablation(path: str | Path) -> tuple[AblationConfig, RunConfig]:
    """The ablation file and its base run config (path relative to the ablation file)."""
    path = Path(path)
    data = read_yaml(path)  # a syntax error: one line naming the file, line and column
    try:
        abl = from_dict(AblationConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = Path(abl.base)
    return abl, load_config(base if base.is_absolute() else path.parent / base)


def pair_config(base: RunConfig, abl: AblationConfig, encoder: str, connector: str, out: Path) -> RunConfig:
    """The base run config with this pair's encoder and connector, training under out/<encoder>__<connector>."""
    cfg = copy.deepcopy(base)
    cfg.model.encoder = from_dict(EncoderConfig, copy.deepcopy(abl.encoders[encoder]), f"encoders.{encoder}")
    cfg.model.connector = from_dict(ConnectorConfig, copy.deepcopy(abl.connectors[connector]),
                                    f"connectors.{connector}")
    cfg.train.output_dir = str(out / f"{encoder}__{connector}")
    return cfg


class PeakMemory:
    """Peak memory of this process while the block runs, in MiB: allocated CUDA memory on a GPU,
    resident set size (sampled every 20 ms from /proc) on CPU; None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.kind = device, None, None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self):
        while not self._stop.wait(0.02):
            rss = self._rss()
            if rss is not None:
                self._bytes = max(self._bytes, rss)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda allocated"
        elif self._rss() is not None:
            self.kind, self._bytes = "cpu rss", self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda allocated":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu rss":
            self._stop.set()
            self._thread.join()
            self.peak = self._bytes / 2**20
        return False


def image_tokens_per_sample(model, eval_path: str, limit: int = 256) -> float:
    """Mean number of image placeholder tokens in the first `limit` samples of the eval set."""
    from ..data.dataset import ConversationDataset

    ds = ConversationDataset(eval_path, model.processor())
    n = min(len(ds), limit)
    counts = [int((ds[i]["input_ids"] == model.image_token_id).sum()) for i in range(n)]
    return sum(counts) / max(n, 1)


def _same_description(saved: dict, described: dict) -> bool:
    """Whether a pair's saved description is this one. Its run config is read through today's schema first,
    so a setting vlmkit added since (at its default) does not make every finished pair train again; one
    that cannot be read any more (a setting since removed) is a different configuration."""
    try:
        run = to_dict(from_dict(RunConfig, saved["run"], "run"))
    except (ConfigError, KeyError, TypeError, ValueError):
        return False
    return json.loads(json.dumps({**saved, "run": run}, default=str)) == described


def run_pair(cfg: RunConfig, encoder: str, connector: str, eval_data: str, rerun: bool = False,
             cpu: bool = False, context: dict | None = None) -> dict:
    """Train and evaluate one pair (or reuse its finished result); returns its result row.

    Each pair gets its own Accelerator (its logs go to its own folder); processes coordinate
    through accelerate's shared process state."""
    import gc

    from accelerate import PartialState

    from ..training.distributed import destroy_at_exit
    from ..training.engine import make_accelerator
    from ..training.run import run
    from .metrics import demo_metrics

    state = PartialState(cpu=cpu)
    destroy_at_exit()

    out = Path(cfg.train.output_dir)
    # what makes a result reusable: the run config, the eval set and anything else that shaped it (demo size)
    described = json.loads(json.dumps({"run": to_dict(cfg), "eval_data": eval_data, **(context or {})}, default=str))
    result_file, config_file = out / RESULT_NAME, out / CONFIG_NAME
    same = config_file.exists() and _same_description(json.loads(config_file.read_text()), described)
    if same and result_file.exists() and not rerun:
        state.print(f"[ablation] {encoder} + {connector}: finished before, reused ({result_file})")
        return json.loads(result_file.read_text())
    if not same or rerun:
        cfg.train.resume = "never"  # a changed configuration never continues the old one's checkpoints
    state.wait_for_everyone()  # every process has read the old files before the main one replaces them
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        result_file.unlink(missing_ok=True)
        config_file.write_text(json.dumps(described, indent=2))
    state.wait_for_everyone()
    state.print(f"\n[ablation] {encoder} + {connector} -> {out}")
    t0 = time.perf_counter()
    with PeakMemory(state.device) as mem:
        model, accelerator, stage_metrics = run(cfg, accelerator=make_accelerator(cfg.train, cpu=cpu))
    row = None
    if accelerator.is_main_process:
        metrics = demo_metrics(model, eval_data, stage_metrics, t0)
        row = {
            "encoder": encoder, "connector": connector,
            "image_tokens": image_tokens_per_sample(model, eval_data),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "eval_accuracy": metrics["eval_accuracy"],
            "eval_accuracy_no_image": metrics["eval_accuracy_no_image"],
            "train_samples_per_second": metrics["train_samples_per_second"],
            "peak_memory_mib": mem.peak, "memory_kind": mem.kind,
            "eval_accuracy_per_type": metrics["eval_accuracy_per_type"],
            "wall_seconds": metrics["wall_seconds"], "device": str(accelerator.device),
            "processes": accelerator.num_processes,
        }
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, result_file)  # the result appears whole or not at all
    accelerator.wait_for_everyone()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row if row is not None else json.loads(result_file.read_text())


def _fmt(key: str, value) -> str:
    if value is None:
        return ""
    if key in ("eval_accuracy", "eval_accuracy_no_image"):
        return f"{value:.3f}"
    if key == "image_tokens":
        return f"{value:g}"
    if key == "trainable_params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" if c in ("encoder", "connector") else "---:" for c in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    kinds = sorted({r.get("memory_kind") for r in rows if r.get("memory_kind")})
    note = f"\nPeak memory: {', '.join(kinds)} of the training process." if kinds else ""
    return "\n".join([head, sep, *body]) + "\n" + note + "\n"


def plot(rows: list[dict], path: Path, title: str = "Encoder / connector ablation") -> None:
    """Accuracy with real and with blank images (left), training speed and image tokens (right)."""
    require("matplotlib", "plots", "the ablation plot").use("Agg")
    plt = require("matplotlib.pyplot", "plots", "the ablation plot")

    labels = [f"{r['encoder']}\n+ {r['connector']}" for r in rows]
    x = range(len(rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 1.9 * len(rows) + 4), 4.6))
    w = 0.38
    real = ax.bar([i - w / 2 for i in x], [r["eval_accuracy"] for r in rows], w, label="with the image")
    blank = ax.bar([i + w / 2 for i in x], [r["eval_accuracy_no_image"] for r in rows], w, color="#bbbbbb",
                   label="blank image")
    ax.bar_label(real, fmt="%.2f", fontsize=8)
    ax.bar_label(blank, fmt="%.2f", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("eval accuracy")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.legend(loc="upper left", ncols=2, fontsize=8, frameon=False)
    ax.set_title("accuracy on held-out questions")
    speed = ax2.bar(list(x), [r["train_samples_per_second"] for r in rows], 0.6, color="#4c72b0")
    ax2.bar_label(speed, labels=[f"{r['image_tokens']:g} tok" for r in rows], fontsize=8)
    ax2.set_ylabel("train samples/s")
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_title("training speed")
    ax2.margins(y=0.12)
    ax2.text(0.99, 0.99, "bar label: image tokens / sample", transform=ax2.transAxes, ha="right", va="top",
             fontsize=8, color="#555555")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(rows: list[dict], out: Path) -> dict[str, str]:
    """ablation.csv (every column, full precision), ablation.md (the table) and ablation.png (the plot)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "ablation.csv", "md": out / "ablation.md", "png": out / "ablation.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "memory_kind", "wall_seconds", "device"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(markdown(rows))
    plot(rows, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def run_ablation(abl: AblationConfig, base: RunConfig, pairs: list[tuple[str, str]], rerun: bool = False,
                 cpu: bool = False) -> tuple[list[dict], dict[str, str] | None]:
    """Every pair in order (see the module docstring); the report is written by the main process."""
    from accelerate import PartialState

    from ..training.distributed import destroy_at_exit

    require("matplotlib", "plots", "the ablation plot (ablation.png)")  # before any training, not after it
    state = PartialState(cpu=cpu)
    destroy_at_exit()
    out = Path(abl.output_dir)
    rows = []
    for encoder, connector in pairs:
        cfg = pair_config(base, abl, encoder, connector, out)
        rows.append(run_pair(cfg, encoder, connector, abl.eval_data, rerun, cpu, {"demo": abl.demo}))
    paths = write_report(rows, out) if state.is_main_process else None
    state.wait_for_everyone()
    return rows, paths
