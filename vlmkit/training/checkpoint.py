"""Resumable training state: what a checkpoint holds besides the model, how it is written, and where a
run that was stopped (killed, crashed, preempted) continues.

A checkpoint, `output_dir/checkpoints/<stage>/checkpoint-<step>/`, is a model folder (`VLM.save_pretrained`:
config.json, model.safetensors, tokenizer, adapters/) plus

    optimizer.pt         the optimizer's state dict (read back with torch.load(weights_only=True))
    trainer_state.json   stage, step, epoch / offset of each process's data stream, scheduler state,
                         skipped samples so far (small, readable)
    rng_state.json       each process's RNG states: python, numpy, torch, CUDA

all written under a temporary `.checkpoint-<step>.*` name, fsynced and renamed in one go: a crash
midway leaves the previous checkpoint whole and no partial one under a real name. A finished stage's
folder `output_dir/<stage>/` is written the same way with a trainer_state.json that says `done`.
Checkpoints are taken at optimizer-step boundaries, so the accumulation position is the step count.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .engine import engine, full_state_dict

STATE_NAME = "trainer_state.json"
RNG_NAME = "rng_state.json"
OPTIMIZER_NAME = "optimizer.pt"
METRICS_NAME = "metrics.json"
MODEL_FILES = ("config.json", "model.safetensors")
"""What `VLM.save_pretrained` writes that resuming reads (besides the adapters config.json lists)."""
ENGINE_DIR = "engine"
"""Under DeepSpeed / FSDP: the sharded optimizer (and engine) state in accelerate's `save_state` layout."""
FORMAT = 1
_CKPT_RE = re.compile(r"checkpoint-(\d+)")


# ---- RNG states as JSON ---------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This process's python, numpy, torch CPU and CUDA RNG states, as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- reading and writing ---------------------------------------------------------------------------
def json_writer(data, indent: int | None = 2) -> callable:
    """A `save_pretrained(extra_files=...)` writer of `data` as JSON."""
    def write(path: Path) -> None:
        with open(path, "w") as f:
            json.dump(data, f, indent=indent)
    return write


def torch_writer(obj) -> callable:
    def write(path: Path) -> None:
        torch.save(obj, path)
    return write


def move_writer(src: Path) -> callable:
    """A `save_pretrained(extra_files=...)` writer that moves the folder `src` (written by every process)
    into place: a rename, on the same file system."""
    def write(path: Path) -> None:
        Path(src).rename(path)
    return write


def read_state(folder: str | os.PathLike) -> dict | None:
    """A checkpoint's or finished stage's trainer_state.json; None when there is none (or it is unreadable)."""
    try:
        with open(Path(folder) / STATE_NAME) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def load_rng_state(folder: str | os.PathLike, rank: int) -> dict:
    """Process `rank`'s RNG states saved in a checkpoint or finished stage folder."""
    with open(Path(folder) / RNG_NAME) as f:
        states = json.load(f)
    if rank >= len(states):
        raise ValueError(f"{folder}: RNG states of {len(states)} process(es), this is process {rank}")
    return states[rank]


def load_optimizer_state(folder: str | os.PathLike) -> dict:
    """The optimizer state of a checkpoint: tensors and plain containers only (weights_only)."""
    return torch.load(Path(folder) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """A stage's complete resumable checkpoints, oldest first (temporary and model-only folders are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _CKPT_RE.fullmatch(p.name)) and p.is_dir() and (p / STATE_NAME).exists()]
    return [p for _, p in sorted(found)]


def prune(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a stage (after a new one was written)."""
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def clean_temporaries(out: Path, stage_names: list[str]) -> list[Path]:
    """Remove what a killed process left half-written: `.<name>.*` temporary folders of checkpoints and
    model folders. A `.<name>.old` whose `<name>` is missing (killed between the two renames of a
    replacement) is moved back. Returns what was removed."""
    removed = []
    names = sorted(set(stage_names) | {"model"}, key=len, reverse=True)
    for d in [out] + [out / "checkpoints" / s for s in stage_names]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if not p.name.startswith(".") or not p.is_dir():
                continue
            if d == out:
                base = next((n for n in names if p.name.startswith(f".{n}.")), None)
            else:
                m = re.match(r"\.(checkpoint-\d+)\.", p.name)
                base = m and m.group(1)
            if base is None:
                continue  # not ours
            target = d / base
            if p.name == f".{base}.old" and not target.exists():
                p.rename(target)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def forget(out: Path, stage_names: list[str]) -> None:
    """Start over in an output_dir that holds an earlier run: drop its checkpoints, logs and stage markers."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("log.jsonl", "samples.jsonl"):
        (out / name).unlink(missing_ok=True)
    for s in stage_names:
        (out / s / STATE_NAME).unlink(missing_ok=True)


def truncate_log(path: Path, stage_names: list[str], stage_index: int, step: int) -> None:
    """Keep the records of finished stages and of the current one up to `step`; drop the rest (and any
    line cut short by a kill), so that a resumed run's log reads like an uninterrupted one's."""
    if not path.exists():
        return
    done, current = set(stage_names[:stage_index]), stage_names[stage_index] if stage_index < len(stage_names) else None
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("stage") in done or (rec.get("stage") == current and rec.get("step", 0) <= step):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def merge_skipped(parts: list[list[dict]]) -> list[dict]:
    """The skipped samples of every process (`gather_object` of each one's list), once per sample, in index order."""
    by_index = {}
    for part in parts:
        for s in part:
            by_index.setdefault(s["index"], s)
    return [by_index[i] for i in sorted(by_index)]


# ---- is a folder whole? ---------------------------------------------------------------------------------
def _safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header unreadable, or shorter than its header says), from
    its header and size only: nothing is loaded."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated ({size} bytes, its header alone says {n + 8})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    want = 8 + n + max(ends, default=0)
    if size < want:
        return f"{path.name} is truncated ({size:,} of {want:,} bytes)"
    return None


def _json_damage(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read ({type(e).__name__})"
    return None


def damage(folder: str | os.PathLike) -> str | None:
    """What makes a checkpoint or finished stage folder unusable for resuming: a file missing, truncated or
    unreadable (checked from headers and sizes; weights are not loaded). None when it is whole."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        return f"{STATE_NAME} is missing or unreadable"
    need = list(MODEL_FILES) + [RNG_NAME]
    if not state.get("done"):
        need.append(ENGINE_DIR if (folder / ENGINE_DIR).is_dir() else OPTIMIZER_NAME)
    missing = [n for n in need if not (folder / n).exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in ("config.json", RNG_NAME):
        why = _json_damage(folder / name)
        if why:
            return why
    weights = [folder / "model.safetensors"]
    adapters = (json.loads((folder / "config.json").read_text()).get("adapters") or {})
    for sub in adapters.values() if isinstance(adapters, dict) else []:
        a = folder / sub / "adapter_model.safetensors"
        if not a.exists() or not (folder / sub / "adapter_config.json").exists():
            return f"{sub}/ is incomplete"
        weights.append(a)
    for w in weights:
        why = _safetensors_damage(w)
        if why:
            return why
    opt = folder / OPTIMIZER_NAME
    if not state.get("done") and opt.exists() and not zipfile.is_zipfile(opt):
        return f"{OPTIMIZER_NAME} is truncated or unreadable ({opt.stat().st_size:,} bytes)"
    return None


def _numbered(folder: Path) -> list[Path]:
    """Every checkpoint-<step> folder of a stage that holds a model or a state, oldest first (what a kill
    mid-write never leaves under a real name; what a later loss may have damaged)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.fullmatch(p.name)) and p.is_dir()
             and any((p / n).exists() for n in (STATE_NAME,) + MODEL_FILES)]
    return [p for _, p in sorted(found)]


@contextmanager
def writing(path, what: str = ""):
    """A full disk met inside the block becomes a DiskFullError naming `path` (unless it already names one)."""
    from ..errors import DiskFullError, disk_full, is_disk_full

    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(e, path, what) from e
        raise


# ---- where a run continues --------------------------------------------------------------------------
@dataclass
class ResumePoint:
    stage_index: int
    """The stage to run next; len(stages) when every stage is finished."""
    checkpoint: Path | None = None
    """A mid-stage checkpoint of that stage to continue from (None: the stage starts at step 0)."""
    state: dict | None = None
    """The checkpoint's trainer_state.json."""
    boundary: dict | None = None
    """The previous stage's trainer_state.json (done), when the stage starts at step 0."""
    boundary_dir: Path | None = None
    """The previous stage's saved model, when the stage starts at step 0."""
    damaged: list[str] = field(default_factory=list)
    """Newer checkpoints (or a finished stage's folder) passed over because a file is missing or truncated."""

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0

    def describe(self, stage_names: list[str], out: Path) -> str:
        lines = [f"resume: {d}: damaged, passed over" for d in self.damaged]
        return "\n".join(lines + [self._where(stage_names, out)])

    def _where(self, stage_names: list[str], out: Path) -> str:
        done = ", ".join(stage_names[:self.stage_index]) or "none"
        if self.checkpoint is None and self.boundary_dir is None:
            return (f"resuming: nothing usable is left: stage {stage_names[self.stage_index]} starts from its "
                    f"beginning")
        if self.checkpoint is not None:
            return (f"resuming: stage {stage_names[self.stage_index]} at step {self.step}/{self.state['total']} "
                    f"(epoch {self.state['epoch']}, batch {self.state['offset']}) from {self.checkpoint}; "
                    f"finished stages: {done}")
        if self.stage_index >= len(stage_names):
            return f"resuming: every stage is finished ({done}); the model is {self.boundary_dir}"
        return (f"resuming: finished stages: {done}; stage {stage_names[self.stage_index]} starts from "
                f"{self.boundary_dir}")


def find_resume(out: Path, stage_names: list[str], mode: str = "auto") -> ResumePoint | None:
    """Where a run in `out` continues. mode: auto (None when there is nothing to resume), latest (an error
    then), never (None), or the path of a checkpoint / finished stage folder."""
    if mode == "never":
        return None
    if mode not in ("auto", "latest"):
        return _explicit(Path(mode), out, stage_names)
    finished, damaged = [], []
    for name in stage_names:
        st = read_state(out / name)
        if not (st and st.get("done") and st.get("stage") == name):
            break
        why = damage(out / name)
        if why:  # the stage is run again from its last whole checkpoint
            damaged.append(f"{out / name} ({why})")
            break
        finished.append(st)
    c = len(finished)
    found = _numbered(out / "checkpoints" / stage_names[c]) if c < len(stage_names) else []
    for cand in reversed(found):  # the newest whole one; a damaged one is named and passed over
        why = damage(cand)
        if why is None:
            return ResumePoint(c, cand, read_state(cand), damaged=damaged)
        damaged.append(f"{cand} ({why})")
    if c:
        return ResumePoint(c, boundary=finished[-1], boundary_dir=out / stage_names[c - 1], damaged=damaged)
    if damaged:
        return ResumePoint(0, damaged=damaged)
    if mode == "latest":
        raise FileNotFoundError(f"resume: {out} holds no checkpoint (checkpoints/<stage>/checkpoint-N with "
                                f"{STATE_NAME}) and no finished stage of {stage_names}")
    return None


def _explicit(path: Path, out: Path, stage_names: list[str]) -> ResumePoint:
    st = read_state(path)
    if st is None:
        raise FileNotFoundError(f"resume: {path} is not a resumable checkpoint (no readable {STATE_NAME}; "
                                f"written by vlmkit's training loop with train.save_steps)")
    why = damage(path)
    if why:
        raise ValueError(f"resume: {path} is damaged ({why}); give an older checkpoint, or --resume without a "
                         f"path to let vlmkit pick the newest whole one")
    if st.get("stage") not in stage_names:
        raise ValueError(f"resume: {path} belongs to stage {st.get('stage')!r}, not one of this run's {stage_names}")
    i = stage_names.index(st["stage"])
    if st.get("done"):
        return ResumePoint(i + 1, boundary=st, boundary_dir=path)
    return ResumePoint(i, path, st)


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
        extra[ENGINE_DIR] = move_writer(staging)
    elif optimizer is not None:
        extra[OPTIMIZER_NAME] = torch_writer(optimizer.state_dict())
    if state is not None:
        extra[STATE_NAME] = json_writer(state)
    if rng is not None:
        extra[RNG_NAME] = json_writer(rng, indent=None)
    save_model(accelerator, model, path, extra)
    if accelerator.is_main_process:
        prune(path.parent, keep)
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
