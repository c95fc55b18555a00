"""Datasets of conversation samples: records from `sources` (files, folders, saved or hub datasets) in any
layout of `formats`, made model inputs by a Processor.

A sample (internal form): {"id", "image" | "images": path | [paths] | PIL image | {"bytes"}, "video" | "videos":
path | [paths] (a video file or a folder of frames), "conversations": [...]}. Videos are decoded here (so in the
DataLoader workers) by `video.load_video` with the stage's `VideoOptions` (data.* keys), the frame count lowered to
the model's token budget before decoding. Errors name the source, the sample index and id, and what is wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch.utils.data import Dataset

from .conversation import SampleError
from .formats import estimated_length, to_sample
from .images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageError, load_image, prepare_image
from .paths import escape
from .samples import check_record
from .sources import DatasetError, default_image_folder, load_records
from .video import MAX_FRAME_PIXELS, Video, load_video, time_instruction

__all__ = ["ConversationDataset", "DatasetError", "VideoOptions", "add_time_prompt", "confined_path", "load_records"]


@dataclass
class VideoOptions:
    """How a stage reads video samples: its `data.*` video keys (DataConfig documents each)."""

    folder: str = ""
    """data.video_folder ("": the dataset's image folder)."""
    max_frames: int = 8
    fps: float | None = None
    max_video_tokens: int | None = None
    time_prompt: bool = False
    max_frame_pixels: int | None = MAX_FRAME_PIXELS
    frames_fps: float = 1.0
    max_seconds: float | None = None

    @classmethod
    def of(cls, data) -> "VideoOptions":
        """The options of a DataConfig."""
        return cls(data.video_folder, data.max_frames, data.fps, data.max_video_tokens, data.video_time_prompt,
                   data.max_frame_pixels, data.frames_fps, data.max_video_seconds)


def add_time_prompt(conversations: list, videos: list[Video], token: str = "<video>") -> list:
    """LLaVA-Video's time prompt after each video placeholder: `<video>\nQ` -> `<video>\n{instruction}\nQ`
    (`video.time_instruction` of the k-th video after the k-th placeholder); the turns are copied, not changed."""
    pending = iter(videos)
    pattern = re.compile(re.escape(token) + r"\n?")

    def put(m):
        v = next(pending, None)
        return m.group(0) if v is None else f"{token}\n{time_instruction(v)}\n"

    out = []
    for turn in conversations:
        key = "value" if isinstance(turn, dict) and "value" in turn else "content"
        text = turn.get(key) if isinstance(turn, dict) else None
        out.append({**turn, key: pattern.sub(put, text)} if isinstance(text, str) and token in text else turn)
    return out


def confined_path(folder: str, rel: str, allow_outside: bool = False) -> str:
    """`rel` joined to `folder`, refused (ImageError, kind image_outside_folder) when it leads outside the
    folder: an absolute path, `..` climbing out, or a symlink to elsewhere (unless `allow_outside`)."""
    path, base, why = escape(folder, rel)
    if allow_outside or why is None:
        return path
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
                 columns: dict[str, str] | None = None, records=None, video: VideoOptions | None = None):
        self.source = path
        self.video = video or VideoOptions()
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

    @staticmethod
    def video_refs(rec) -> list:
        """The sample's video entries as stored: paths (a file or a folder of frames) or {"path"} dicts."""
        v = rec.get("video", rec.get("videos"))
        if v is None:
            return []
        return v if isinstance(v, list) else [v]

    @property
    def video_folder(self) -> str:
        return self.video.folder or self.image_folder

    @property
    def tokens_for(self):
        """The model's placeholder count of a video of n frames (None: the model takes no video)."""
        if getattr(self.processor, "video_token_id", None) is None:
            return None
        return getattr(self.processor.count_image_tokens, "count_video_tokens", None)

    def load_kwargs(self) -> dict:
        """`video.load_video` / `check_video` keyword arguments of this dataset's options."""
        o = self.video
        return dict(folder=self.video_folder, max_frames=o.max_frames, fps=o.fps, tokens_for=self.tokens_for,
                    max_video_tokens=o.max_video_tokens, max_frame_pixels=o.max_frame_pixels,
                    allow_outside=self.allow_absolute_image_paths, frames_fps=o.frames_fps,
                    max_duration=o.max_seconds)

    def videos(self, rec) -> list[Video]:
        """The sample's videos, sampled and decoded (VideoError with its kind when one cannot be used)."""
        refs = self.video_refs(rec)
        if refs and getattr(self.processor, "video_token_id", None) is None:
            raise SampleError(f"{len(refs)} video(s), but this model takes no video (model.video is not set)",
                              "video_count_mismatch")
        kw = self.load_kwargs()
        return [load_video(r["path"] if isinstance(r, dict) else r, **kw) for r in refs]

    def conversations(self, rec, videos: list[Video]) -> list:
        """The sample's turns, with the time prompt added when data.video_time_prompt is on."""
        if not (videos and self.video.time_prompt):
            return rec["conversations"]
        return add_time_prompt(rec["conversations"], videos, self.processor.video_token)

    def video_tokens(self) -> int:
        """A video's placeholder estimate for grouping by length: the model's count at max_frames (within the
        budget); 128 for a model without video."""
        if self.tokens_for is None:
            return 128
        n = self.tokens_for(self.video.max_frames)
        return min(n, self.video.max_video_tokens) if self.video.max_video_tokens else n

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
            videos = self.videos(rec)
            out = self.processor(self.conversations(rec, videos), self.images(rec), self.template, self.max_length,
                                 videos=videos or None)
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
        """(estimated length, number of images and videos) of every sample (`formats.estimated_length`: words + 128
        per image + `video_tokens()` per video), read without decoding an image or video: an HF dataset's image
        columns are read as stored."""
        from .sources import undecoded

        records = self.records
        if hasattr(records, "features"):
            records = undecoded(records)
        out, per_video = [], self.video_tokens()
        for i in range(len(records)):
            try:
                out.append(estimated_length(to_sample(records[i], self.format, self.columns), per_video))
            except SampleError:  # a bad sample: training reports it; here it counts as text only
                out.append((0, 0))
        return out
