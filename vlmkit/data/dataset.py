"""Datasets of LLaVA-format samples: a JSON / JSONL file or an HF dataset with the same fields.

A sample: {"id", "image": path | [paths] | PIL image (HF Image feature), "conversations": [...]}.
Errors name the source, the sample index and id, and what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch.utils.data import Dataset

from .conversation import SampleError
from .images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageError, load_image, prepare_image
from .samples import check_record


class DatasetError(ValueError):
    """A dataset file that cannot be used as a whole; the message names the file (and the line).
    `kind`: unreadable_dataset | empty_dataset (check-data's names)."""

    def __init__(self, message: str, kind: str = "unreadable_dataset"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return type(self), (str(self), self.kind)


def _text(path: str, raw: bytes) -> str:
    """UTF-8 text (a leading byte-order mark allowed), or an error naming the file, line and byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {col} "
                           f"(save the file as UTF-8)") from None


def _json_error(path: str, e: json.JSONDecodeError, line: int | None = None) -> DatasetError:
    where = f"line {line}, column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
    hint = ""
    if line is None and e.msg == "Extra data" and e.lineno > 1:
        hint = " (one JSON object per line? name the file .jsonl)"
    return DatasetError(f"{path}: invalid JSON at {where}: {e.msg}{hint}")


def load_records(path: str):
    """A list of samples from a .json / .jsonl file, or an HF dataset (`hf:name[:split]` or a saved dir).
    Errors name the file and, for text that does not parse, the line (JSONL: the file's own line number)."""
    if path.startswith("hf:"):
        import datasets

        name, _, split = path[3:].partition(":")
        return datasets.load_dataset(name, split=split or "train")
    p = Path(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: a folder, but not a saved HF dataset ({e})") from None
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    if not p.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file: {e.strerror or e}") from None
    text = _text(path, raw)
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise _json_error(path, e, line=n) from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def confined_path(folder: str, rel: str, allow_outside: bool = False) -> str:
    """`rel` joined to `folder`, refused (ImageError, kind image_outside_folder) when it leads outside the
    folder: an absolute path, `..` climbing out, or a symlink to elsewhere (unless `allow_outside`)."""
    path = os.path.join(folder, rel)
    if allow_outside:
        return path
    base = os.path.realpath(folder or ".")
    if os.path.isabs(rel):
        why = "an absolute path"
    else:
        real = os.path.realpath(path)
        if os.path.commonpath([base, real]) == base:
            return path
        lexical = os.path.normpath(os.path.join(base, rel))
        why = ("'..' climbs out of it" if os.path.commonpath([base, lexical]) != base
               else f"a symlink to {real}")
    raise ImageError(f"image path {rel!r} leads outside the image folder {base} ({why}); refused. Set "
                     f"data.allow_absolute_image_paths: true (check-data --allow-absolute-image-paths) if your "
                     f"data keeps its images elsewhere", "image_outside_folder")


class ConversationDataset(Dataset):
    """Samples -> model inputs through a Processor; bad samples raise, or are returned as skipped.

    Image paths are relative to `image_folder` and must stay inside it (`allow_absolute_image_paths`: any
    path). Every image is refused from its header when it has more than `max_image_pixels` pixels, an aspect
    ratio over `max_aspect_ratio`, or a largest buffer (the processor's `canvas`) over `max_image_pixels`.
    """

    def __init__(self, path: str, processor, image_folder: str = "", template: str | None = None,
                 max_length: int = 2048, on_bad_sample: str = "error",
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
                 allow_absolute_image_paths: bool = False):
        self.source = path
        self.records = load_records(path)
        if len(self.records) == 0:
            raise DatasetError(f"{path}: the dataset holds no samples", "empty_dataset")
        folder = image_folder or (os.path.dirname(path) if not path.startswith("hf:") else "")
        self.image_folder = folder
        self.processor, self.template, self.max_length = processor, template, max_length
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.allow_absolute_image_paths = allow_absolute_image_paths

    def __len__(self):
        return len(self.records)

    @staticmethod
    def image_refs(rec) -> list:
        """The sample's image entries as stored: paths, {"path"/"bytes"} dicts or PIL images."""
        img = rec.get("image", rec.get("images"))
        if img is None:
            return []
        return img if isinstance(img, list) else [img]

    def image_source(self, it, k: int = 0):
        """(what PIL opens, a name for messages) of one image entry; (None, name) for a PIL image.
        A path outside the image folder raises ImageError (image_outside_folder)."""
        if isinstance(it, str):
            path = confined_path(self.image_folder, it, self.allow_absolute_image_paths)
            return path, path
        if isinstance(it, dict) and it.get("path") and not it.get("bytes"):
            path = confined_path(self.image_folder, it["path"], self.allow_absolute_image_paths)
            return path, path
        if isinstance(it, dict) and it.get("bytes"):
            import io

            return io.BytesIO(it["bytes"]), f"image {k} ({it.get('path') or 'embedded bytes'})"
        return None, f"image {k}"

    def images(self, rec) -> list:
        out = []
        limits = (self.max_image_pixels, self.max_aspect_ratio, getattr(self.processor, "canvas", None))
        for k, it in enumerate(self.image_refs(rec)):
            src, name = self.image_source(it, k)
            if src is not None:
                out.append(load_image(src, limits[0], name, *limits[1:]))
            else:  # PIL image from an HF Image feature
                out.append(prepare_image(it, limits[0], name, *limits[1:]))
        return out

    def sample_id(self, i: int):
        rec = self.records[i]
        sid = rec.get("id", i) if isinstance(rec, dict) else i
        return sid if sid is None or isinstance(sid, (str, int)) else repr(sid)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        sid = self.sample_id(i)
        try:
            check_record(rec)
            out = self.processor(rec["conversations"], self.images(rec), self.template, self.max_length)
        except (SampleError, OSError, ValueError) as e:
            kind = getattr(e, "kind", "invalid_sample")
            if self.on_bad_sample == "skip":
                return {"skipped": {"index": i, "id": sid, "reason": str(e), "kind": kind}}
            raise SampleError(f"{self.source}: sample {i} (id={sid}): {e}", kind) from None
        except Exception as e:  # noqa: BLE001 - nothing above expects it: a sample nobody foresaw, or a bug
            reason = f"{type(e).__name__}: {e}"
            if self.on_bad_sample == "skip":
                return {"skipped": {"index": i, "id": sid, "reason": reason, "kind": "unexpected_error"}}
            raise SampleError(f"{self.source}: sample {i} (id={sid}): {reason}", "unexpected_error") from e
        out["id"] = sid
        return out
