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
from .images import MAX_IMAGE_PIXELS, load_image, prepare_image


def load_records(path: str):
    """A list of samples from a .json / .jsonl file, or an HF dataset (`hf:name[:split]` or a saved dir)."""
    if path.startswith("hf:"):
        import datasets

        name, _, split = path[3:].partition(":")
        return datasets.load_dataset(name, split=split or "train")
    p = Path(path)
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    if not p.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(p) as f:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


class ConversationDataset(Dataset):
    """Samples -> model inputs through a Processor; bad samples raise, or are returned as skipped."""

    def __init__(self, path: str, processor, image_folder: str = "", template: str | None = None,
                 max_length: int = 2048, on_bad_sample: str = "error",
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        self.source = path
        self.records = load_records(path)
        folder = image_folder or (os.path.dirname(path) if not path.startswith("hf:") else "")
        self.image_folder = folder
        self.processor, self.template, self.max_length = processor, template, max_length
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels

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
        """(what PIL opens, a name for messages) of one image entry; (None, name) for a PIL image."""
        if isinstance(it, str):
            path = os.path.join(self.image_folder, it)
            return path, path
        if isinstance(it, dict) and it.get("path") and not it.get("bytes"):
            path = os.path.join(self.image_folder, it["path"])
            return path, path
        if isinstance(it, dict) and it.get("bytes"):
            import io

            return io.BytesIO(it["bytes"]), f"image {k} ({it.get('path') or 'embedded bytes'})"
        return None, f"image {k}"

    def images(self, rec) -> list:
        out = []
        for k, it in enumerate(self.image_refs(rec)):
            src, name = self.image_source(it, k)
            if src is not None:
                out.append(load_image(src, self.max_image_pixels, name))
            else:  # PIL image from an HF Image feature
                out.append(prepare_image(it, self.max_image_pixels, name))
        return out

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        sid = rec.get("id", i) if isinstance(rec, dict) else i
        try:
            if not isinstance(rec, dict) or "conversations" not in rec:
                raise SampleError("no 'conversations' field" if isinstance(rec, dict) else
                                  f"expected a JSON object, got {type(rec).__name__}")
            out = self.processor(rec["conversations"], self.images(rec), self.template, self.max_length)
        except (SampleError, OSError, ValueError) as e:
            msg = f"{self.source}: sample {i} (id={sid}): {e}"
            kind = getattr(e, "kind", "invalid_sample")
            if self.on_bad_sample == "skip":
                return {"skipped": {"index": i, "id": sid, "reason": str(e), "kind": kind}}
            raise SampleError(msg, kind) from None
        out["id"] = sid
        return out
