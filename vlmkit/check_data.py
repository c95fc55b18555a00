"""`vlmkit check-data`: scan datasets before training; count the bad samples and name the first ones.

Every sample goes through the code training runs, `ConversationDataset.__getitem__`: its images
through `load_image` (with the same decompression-bomb limit), its conversation through the
`Processor` -> `encode` -> `truncate`. Those raise `SampleError` with a `kind`, which is what is
counted here; nothing is checked twice in two ways, so a sample that passes here is one training
accepts, and training meets the same errors lazily (raised, or counted and skipped with
`data.on_bad_sample: skip`).

Videos are checked first with `video.check_video` (path, headers, limits, the model's token budget through its
`count_video_tokens`, then the first sampled frame decoded): a bad video is reported with its kind and the text
is checked with stand-in frames; a sample whose videos pass goes through the training path as above.

Notes are not errors: images in modes other than RGB, with an EXIF rotation or several frames,
and samples that fill max_length. The training path handles them (`load_image` converts,
composites and rotates); they are listed so that a surprise in the data is seen before training.

The processor comes from a saved model folder or a run config without loading any weights
(`load_processor`, `build_processor`).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data.conversation import SampleError
from .data.dataset import ConversationDataset, VideoOptions
from .data.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS
from .data.samples import check_record, record_notes
from .data.video import VideoError, check_video, frames_for_budget

ERRORS = {
    "missing_image": "image file not found",
    "corrupt_image": "not an image, or corrupt / truncated",
    "image_too_large": "header declares more pixels than max_image_pixels, or a canvas that large (decompression "
                       "bomb, or a thin image padded to a square)",
    "extreme_aspect_ratio": "thinner than max_aspect_ratio allows (refused from its header)",
    "image_outside_folder": "image path leads outside image_folder (absolute, '..' or a symlink)",
    "image_count_mismatch": "<image> placeholders differ from the sample's images",
    "image_in_assistant_turn": "<image> in an assistant turn",
    "no_assistant_turn": "no assistant turn",
    "no_trained_token": "nothing left to train on (after truncation to max_length)",
    "too_long_for_images": "too long to keep its image tokens within max_length",
    "invalid_sample": "malformed sample (field types, roles, no conversations)",
    "turn_order": "turns out of order (assistant first, two of one side in a row, a late system turn)",
    "empty_answer": "an assistant turn with no text",
    "video_missing": "video file or frame folder not found",
    "video_corrupt": "not a video (no video stream, unreadable container or frames)",
    "video_no_frames": "a video or frame folder with no frames",
    "video_too_large": "frames of more pixels than max_frame_pixels (from the header)",
    "video_too_long": "over max_video_tokens even at one frame, or longer than max_video_seconds",
    "video_outside_folder": "video path leads outside video_folder (absolute, '..' or a symlink)",
    "video_count_mismatch": "<video> placeholders differ from the sample's videos (or the model takes no video)",
    "video_in_assistant_turn": "<video> in an assistant turn",
    "too_long_for_videos": "too long to keep its video tokens within max_length",
    "unexpected_error": "an error nothing foresaw (please report it)",
    "unreadable_dataset": "the dataset file itself cannot be read",
    "empty_dataset": "the dataset holds no samples",
}
IMAGE_ERRORS = ("missing_image", "corrupt_image", "image_too_large", "extreme_aspect_ratio", "image_outside_folder",
                "video_missing", "video_corrupt", "video_no_frames", "video_too_large", "video_too_long",
                "video_outside_folder")
NOTE_ASPECT_RATIO = 10
"""Images more elongated than this (long side / short side) get a note saying what training does with them."""
MODE_NOTES = {
    "CMYK": "CMYK, converted to RGB",
    "RGBA": "alpha composited on white",
    "LA": "greyscale + alpha, composited on white",
    "P": "palette, expanded (transparency composited on white)",
    "PA": "palette + alpha, composited on white",
    "I;16": "16-bit, rescaled to 8-bit",
    "I;16B": "16-bit, rescaled to 8-bit",
    "I": "32-bit integer, rescaled to 8-bit",
    "L": "greyscale, replicated to RGB",
    "1": "1-bit, black and white",
}
NOTES = {
    "exif_rotation": "EXIF orientation: rotated on load",
    "animated": "several frames: the first is used",
    "at_max_length": "filled max_length (truncated, or exactly that long)",
    "extreme_aspect": f"aspect ratio over {NOTE_ASPECT_RATIO}:1 (kept; the note says what training does with it)",
    "duplicate_id": "an id used by an earlier sample too (both are trained on; logs cannot tell them apart)",
    "unanswered_last_turn": "the last human turn has no answer (left out of training)",
}


@dataclass
class Target:
    """One dataset to check, with the settings training would use for it."""

    path: str
    processor: object
    name: str = ""
    image_folder: str = ""
    template: str | None = None
    max_length: int = 2048
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO
    allow_absolute_image_paths: bool = False
    format: str = "auto"
    """data.format: the sample layout (auto: from each sample's fields)."""
    columns: dict = field(default_factory=dict)
    """data.columns: vlmkit field -> the dataset's column name."""
    video: VideoOptions = field(default_factory=VideoOptions)
    """The data.* video keys (folder, frames, fps, budget, limits)."""


@dataclass
class Tally:
    """Counts per kind and the first few offending samples of each."""

    examples: int = 5
    kinds: dict = field(default_factory=dict)

    def add(self, kind: str, item: dict) -> None:
        entry = self.kinds.setdefault(kind, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < self.examples:
            entry["first"].append(item)


# ---- one sample ---------------------------------------------------------------------------------
def image_notes(ds: ConversationDataset, item, k: int, n_images: int = 1) -> list[tuple[str, str]]:
    """Notes about one image entry from its header only (mode, EXIF orientation, frames, extreme aspect ratio);
    never raises: an unreadable image is the training path's error, reported from there."""
    try:
        src, name = ds.image_source(item, k)  # refuses a path outside the image folder: nothing is opened
        if src is None:
            im = item
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = Image.open(src)
        try:
            mode, (w, h) = im.mode, im.size
            orientation = im.getexif().get(0x0112, 1)
            frames = getattr(im, "n_frames", 1)
        finally:
            if src is not None:
                im.close()
    except Exception:
        return []
    out = []
    if mode != "RGB":
        out.append((f"mode_{mode}", f"{name}: mode {mode}: {MODE_NOTES.get(mode, 'converted to RGB')}"))
    if orientation not in (None, 1):
        out.append(("exif_rotation", f"{name}: EXIF orientation {orientation}, rotated on load"))
    if frames and frames > 1:
        out.append(("animated", f"{name}: {frames} frames, the first is used"))
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > NOTE_ASPECT_RATIO and not (ds.max_aspect_ratio and ratio > ds.max_aspect_ratio):
        fit = ds.processor.fit_note(w, h, n_images) if hasattr(ds.processor, "fit_note") else "kept"
        out.append(("extreme_aspect", f"{name}: {w}x{h}, aspect ratio {ratio:.0f}:1: {fit}"))
    return out


def check_sample(ds: ConversationDataset, i: int) -> dict:
    """Errors and notes of sample i. `ds` must be in skip mode: its __getitem__ returns the error."""
    errors: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    sid = ds.sample_id(i)
    own_id = isinstance(ds.records[i], dict) and ds.records[i].get(ds.columns.get("id", "id")) is not None
    try:
        rec = ds.record(i)  # any layout, in the internal form (a record of no known layout: reported below)
    except SampleError:
        rec = None
    is_dict = isinstance(rec, dict)
    try:
        notes += record_notes(check_record(rec))
        refs = ds.image_refs(rec)
    except SampleError:  # the training path below reports it
        refs = []
    for k, item in enumerate(refs):
        notes += image_notes(ds, item, k, len(refs))
    tokens = None
    video_errors = check_videos(ds, rec) if is_dict else []
    out = {"skipped": {}} if video_errors else ds[i]  # the training path (skip mode: errors returned, not raised)
    if "skipped" in out:
        errors += video_errors or [(out["skipped"]["kind"], out["skipped"]["reason"])]
        if errors[0][0] in IMAGE_ERRORS and is_dict and "conversations" in rec:
            errors += text_errors(ds, rec, len(refs))
    else:
        tokens = len(out["input_ids"])
        if ds.max_length and tokens >= ds.max_length:
            notes.append(("at_max_length", f"{tokens} tokens: filled max_length {ds.max_length}"))
    return {"index": i, "id": sid, "own_id": own_id, "errors": errors,
            "notes": notes, "tokens": tokens, "images": len(refs)}


def check_videos(ds: ConversationDataset, rec: dict) -> list[tuple[str, str]]:
    """(kind, message) of every video of the sample that training would refuse (`video.check_video`)."""
    kw = ds.load_kwargs()
    out = []
    for ref in ds.video_refs(rec):
        path = ref.get("path") if isinstance(ref, dict) else ref
        if isinstance(path, str) and path.strip():  # a malformed entry: the training path names it
            out += [(p.kind, p.message) for p in check_video(path, **kw)]
    return out


def text_errors(ds: ConversationDataset, rec: dict, n_images: int) -> list[tuple[str, str]]:
    """An image or video error stops the sample before its text is looked at: the text's own errors, found with
    stand-in images of the model's input size and stand-in frames (as many as training would sample, within the
    budget), so one run reports both problems."""
    size = ds.processor.transform.size
    stand_ins = [Image.new("RGB", (size, size)) for _ in range(n_images)]
    try:
        n = frames_for_budget(ds.video.max_frames, ds.tokens_for, ds.video.max_video_tokens)
    except VideoError:
        n = 1
    videos = [[Image.new("RGB", (size, size))] * n for _ in ds.video_refs(rec)]
    try:
        ds.processor(rec["conversations"], stand_ins, ds.template, ds.max_length, videos=videos or None)
    except (SampleError, ValueError) as e:
        return [(getattr(e, "kind", "invalid_sample"), str(e))]
    return []


class _Checks(Dataset):
    """Sample index -> its check result, so a DataLoader can spread the work over processes."""

    def __init__(self, ds: ConversationDataset, limit: int | None = None):
        self.ds, self.n = ds, min(len(ds), limit) if limit else len(ds)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return check_sample(self.ds, i)


def _identity(x):
    return x


# ---- progress -----------------------------------------------------------------------------------
class Progress:
    """`done/total samples (rate/s, bad)` on stderr, at most once a second (in place on a terminal)."""

    def __init__(self, label: str, total: int, stream=None, every: float = 1.0):
        self.label, self.total, self.every = label, total, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.monotonic()

    def update(self, done: int, bad: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100.0 * done / max(self.total, 1)
        line = f"check-data {self.label}: {done}/{self.total} samples ({pct:.0f}%, {rate:.0f}/s), {bad} bad"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


# ---- datasets -----------------------------------------------------------------------------------
def check_dataset(target: Target, workers: int = 0, examples: int = 5, progress: bool = True,
                  limit: int | None = None) -> dict:
    """The report of one dataset: counts per error and note kind, the first offending samples."""
    head = {"name": target.name or target.path, "path": target.path,
            "template": target.template or target.processor.template, "max_length": target.max_length,
            "max_image_pixels": target.max_image_pixels}
    errors, notes = Tally(examples), Tally(examples)
    try:
        ds = ConversationDataset(target.path, target.processor, target.image_folder, target.template,
                                 target.max_length, on_bad_sample="skip", max_image_pixels=target.max_image_pixels,
                                 max_aspect_ratio=target.max_aspect_ratio,
                                 allow_absolute_image_paths=target.allow_absolute_image_paths,
                                 format=target.format, columns=target.columns, video=target.video)
    except Exception as e:
        kind = getattr(e, "kind", "unreadable_dataset")
        message = str(e) if kind == "empty_dataset" or type(e).__name__ == "DatasetError" else f"{type(e).__name__}: {e}"
        errors.add(kind if kind in ERRORS else "unreadable_dataset",
                   {"file": target.path, "index": None, "id": None, "message": message})
        return {**head, "samples": 0, "checked": 0, "bad_samples": 0, "images": 0, "tokens": None,
                "errors": errors.kinds, "notes": notes.kinds}
    checks = _Checks(ds, limit)
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(checks, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)
    bar = Progress(head["name"], len(checks)) if progress else None
    done = bad = n_images = 0
    lengths = []
    first_of: dict = {}  # id -> index of its first sample
    for r in loader:
        where = {"file": ds.source, "index": r["index"], "id": r["id"]}
        if r["own_id"]:  # an id of the data's own (not the index standing in for one)
            key = (type(r["id"]).__name__, r["id"])
            if key in first_of:
                notes.add("duplicate_id", {**where, "message": f"id {r['id']!r} also at sample {first_of[key]}"})
            else:
                first_of[key] = r["index"]
        for kind, msg in r["errors"]:
            errors.add(kind, {**where, "message": msg})
        for kind, msg in r["notes"]:
            notes.add(kind, {**where, "message": msg})
        bad += bool(r["errors"])
        done += 1
        n_images += r["images"]
        if r["tokens"] is not None:
            lengths.append(r["tokens"])
        if bar:
            bar.update(done, bad)
    if bar:
        bar.update(done, bad, final=True)
    tokens = ({"max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)} if lengths else None)
    return {**head, "samples": len(ds), "checked": done, "bad_samples": bad, "images": n_images,
            "tokens": tokens, "errors": errors.kinds, "notes": notes.kinds}


def check(targets: list[Target], workers: int = 0, examples: int = 5, progress: bool = True,
          limit: int | None = None) -> dict:
    """The report of several datasets; `ok` is False when any has an error."""
    reports = [check_dataset(t, workers, examples, progress, limit) for t in targets]
    n_err = sum(e["count"] for r in reports for e in r["errors"].values())
    return {"ok": n_err == 0, "errors": n_err, "bad_samples": sum(r["bad_samples"] for r in reports),
            "datasets": reports}


# ---- building targets ---------------------------------------------------------------------------
def targets_from_config(config_path: str, data: list[str] | None = None, **overrides) -> list[Target]:
    """Every stage's data with that stage's template, max_length, image folder and pixel limit
    (or the given data files with the overrides). The processor is built without weights."""
    from .config import load_config
    from .models.build import build_processor

    cfg = load_config(config_path)
    processor = build_processor(cfg.model)
    over = {k: v for k, v in overrides.items() if v is not None}
    if data:
        return [Target(p, processor, **over) for p in data]
    return [Target(s.data.path, processor, name=f"{s.name}: {s.data.path}",
                   **{"image_folder": s.data.image_folder, "template": s.data.template,
                      "max_length": s.data.max_length, "max_image_pixels": s.data.max_image_pixels,
                      "max_aspect_ratio": s.data.max_aspect_ratio,
                      "allow_absolute_image_paths": s.data.allow_absolute_image_paths,
                      "format": s.data.format, "columns": s.data.columns, "video": VideoOptions.of(s.data),
                      **over})
            for s in cfg.stages]


def targets_from_model(model_dir: str, data: list[str], trust_remote_code: bool = False,
                       **overrides) -> list[Target]:
    """The given data files against a saved model folder (or a run folder holding model/). The folder's code
    (if it ships any) runs only with `trust_remote_code` (the user's `--trust-remote-code`)."""
    from pathlib import Path

    from .models.build import load_processor
    from .models.serialization import CONFIG_NAME

    d = Path(model_dir)
    if not (d / CONFIG_NAME).exists() and (d / "model" / CONFIG_NAME).exists():
        d = d / "model"
    processor = load_processor(d, trust_remote_code=trust_remote_code)
    over = {k: v for k, v in overrides.items() if v is not None}
    return [Target(p, processor, **over) for p in data]


# ---- output -------------------------------------------------------------------------------------
def _where(item: dict) -> str:
    if item["index"] is None:
        return item["file"]
    return f"{item['file']} #{item['index']} (id={item['id']})"


def format_summary(report: dict, examples: int = 3) -> str:
    """A table per dataset: kind, severity, count, what it means; then the first offending samples."""
    lines = []
    for r in report["datasets"]:
        lim = r["max_image_pixels"]
        lines.append(f"== {r['name']}  (template {r['template']}, max_length {r['max_length']}, "
                     f"max_image_pixels {f'{lim:,}' if lim else 'none'})")
        tok = f", tokens max {r['tokens']['max']} mean {r['tokens']['mean']}" if r["tokens"] else ""
        checked = r["checked"] if r["checked"] == r["samples"] else f"{r['checked']} of {r['samples']}"
        lines.append(f"   {checked} samples, {r['images']} images, {r['bad_samples']} bad sample(s){tok}")
        rows = [("error", k, v) for k, v in sorted(r["errors"].items(), key=lambda kv: -kv[1]["count"])]
        rows += [("note", k, v) for k, v in sorted(r["notes"].items(), key=lambda kv: -kv[1]["count"])]
        if not rows:
            lines.append("   no problems found")
            continue
        w = max(len(k) for _, k, _ in rows)
        lines.append(f"   {'severity':<8}  {'kind':<{w}}  {'count':>7}  meaning")
        for sev, kind, v in rows:
            meaning = ERRORS.get(kind) or NOTES.get(kind) or MODE_NOTES.get(kind.removeprefix("mode_"), "")
            lines.append(f"   {sev.upper() if sev == 'error' else sev:<8}  {kind:<{w}}  {v['count']:>7}  {meaning}")
        for sev, kind, v in rows:
            if sev != "error":
                continue
            lines.append(f"   first {kind}:")
            for item in v["first"][:examples]:
                lines.append(f"     {_where(item)}: {item['message']}")
    if report["ok"]:
        lines.append("check-data: OK, no errors")
    else:
        lines.append(f"check-data: {report['errors']} error(s) in {report['bad_samples']} sample(s) "
                     f"(training with on_bad_sample: error stops at the first; skip leaves them out)")
    return "\n".join(lines)


def parse_columns(items: list[str] | None) -> dict | None:
    """`--column FIELD=COLUMN` flags -> data.columns (None when none given); a malformed one is a ValueError."""
    from .config import DATA_FIELDS

    if not items:
        return None
    out = {}
    for item in items:
        field_name, sep, col = item.partition("=")
        if not sep or field_name not in DATA_FIELDS or not col:
            raise ValueError(f"--column {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(DATA_FIELDS)}")
        out[field_name] = col
    return out


def run_cli(args) -> int:
    """`vlmkit check-data`: exit status 0 when no errors, 1 when any (2: bad arguments, from argparse)."""
    over = dict(image_folder=args.image_folder, template=args.template, max_length=args.max_length,
                max_image_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio,
                allow_absolute_image_paths=args.allow_absolute_image_paths, format=getattr(args, "format", None),
                columns=parse_columns(getattr(args, "column", None)))
    if not args.config and not args.data:
        print("vlmkit check-data: give data files to check against --model", file=sys.stderr)
        return 2
    if args.config:
        targets = targets_from_config(args.config, args.data, **over)
    else:
        targets = targets_from_model(args.model, args.data, trust_remote_code=args.trust_remote_code, **over)
    given = {"folder": "video_folder", "max_frames": "max_frames", "fps": "fps", "max_video_tokens": "max_video_tokens"}
    video = {k: getattr(args, a) for k, a in given.items() if getattr(args, a, None) is not None}
    for t in targets:  # --video-folder / --max-frames / --fps / --max-video-tokens over the stage's data.* keys
        t.video = replace(t.video, **video)
    report = check(targets, workers=args.workers, examples=args.examples, progress=not args.no_progress,
                   limit=args.limit)
    print(format_summary(report, args.examples))
    if args.json:
        text = json.dumps(report, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0 if report["ok"] else 1

