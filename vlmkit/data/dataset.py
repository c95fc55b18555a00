"""Datasets of conversation samples: records from `sources` (files, folders, saved or hub datasets) in any
layout of `formats`, made model inputs by a Processor.

A sample (internal form): {"id", "image" | "images": path | [paths] | PIL image | {"bytes"}, "conversations": [...]}.
Errors name the source, the sample index and id, and what is wrong.
"""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from .conversation import SampleError
from .formats import estimated_length, to_sample
from .images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageError, load_image, prepare_image
from .samples import check_record
from .sources import DatasetError, default_image_folder, load_records

__all__ = ["ConversationDataset", "DatasetError", "confined_path", "load_records"]


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
                 allow_absolute_image_paths: bool = False, format: str = "auto",
                 columns: dict[str, str] | None = None, records=None):
        self.source = path
        self.format, self.columns = format, dict(columns or {})
        self.records = load_records(path) if records is None else records
        if records is None and len(self.records) == 0:
            raise DatasetError(f"{path}: the dataset holds no samples", "empty_dataset")
        self.image_folder = image_folder or default_image_folder(path)
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

    def record(self, i: int):
        """Sample i in the internal form (`formats.to_sample`); a record of no known layout raises SampleError."""
        return to_sample(self.records[i], self.format, self.columns)

    def sample_id(self, i: int):
        return self._sid(self.records[i], i)

    def _sid(self, rec, i: int):
        if not isinstance(rec, dict):
            return i
        sid = rec.get(self.columns.get("id", "id"), i)
        return sid if sid is None or isinstance(sid, (str, int)) else repr(sid)

    def __getitem__(self, i: int) -> dict:
        return self.process(self.records[i], i)

    def process(self, raw, i: int) -> dict:
        """One record (any layout, as stored) -> model inputs, or {"skipped": ...} under on_bad_sample: skip."""
        sid = self._sid(raw, i)
        try:
            rec = to_sample(raw, self.format, self.columns)
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

    def modality_lengths(self) -> list[tuple[int, int]]:
        """(estimated length, number of images) of every sample (`formats.estimated_length`: words + 128 per
        image), read without decoding an image: an HF dataset's image columns are read as stored."""
        from .sources import undecoded

        records = self.records
        if hasattr(records, "features"):
            records = undecoded(records)
        out = []
        for i in range(len(records)):
            try:
                out.append(estimated_length(to_sample(records[i], self.format, self.columns)))
            except SampleError:  # a bad sample: training reports it; here it counts as text only
                out.append((0, 0))
        return out
