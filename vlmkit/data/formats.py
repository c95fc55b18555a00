"""Sample layouts: every supported record shape -> the one internal sample form the processor takes.

The internal form is LLaVA's: {"id", "conversations": [turns], "image" | "images": [...]}, turns as
`{"from", "value"}` or `{"role", "content"}` with `<image>` placeholders in the text (what `check_record`
checks and `Processor.__call__` tokenizes). Layouts read:

    llava      {"id", "image": path | [paths], "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}
               (LLaMA-Factory's sharegpt layout is the same with `images`)
    messages   {"messages": [{"role", "content"}], "images": [...]}: the content either a string with `<image>`
               placeholders (LLaMA-Factory / ms-swift) or a typed list (TRL and the hub's VLM datasets)
               `[{"type": "image"}, {"type": "text", "text": "..."}]`, whose parts are joined by a newline, an
               image part written as `<image>` (so `[image, text Q]` is LLaVA's `"<image>\\nQ"`); images as paths,
               {"bytes"/"path"} dicts or PIL images, in `images` or inside the image parts (`{"type": "image",
               "image": ...}`)

Video (LLaVA-Video / OneVision): a llava record's `video` (a file or a folder of frames, or a list) with `<video>`
in the text; a messages record's `videos` list with `<video>` in string content (LLaMA-Factory), or
`{"type": "video"[, "video": path]}` parts in typed content (TRL), written as `<video>`.

`data.format` declares the layout (auto: from the fields of each sample); `data.columns` maps vlmkit's field
names (id, conversations, messages, image, images) to a dataset's own column names. A sample of the wrong shape
is a SampleError (kind invalid_sample) naming what is wrong, as for LLaVA samples.
"""
from __future__ import annotations

import math

from ..config import DATA_FIELDS as FIELDS
from ..config import DATA_FORMATS as FORMATS
from .conversation import SampleError

__all__ = ["FIELDS", "FORMATS", "estimated_length", "rename_columns", "to_sample"]


def rename_columns(rec: dict, columns: dict[str, str] | None) -> dict:
    """`rec` with each dataset column named in `columns` (vlmkit name -> column) under vlmkit's name."""
    if not columns or not isinstance(rec, dict):
        return rec
    out = dict(rec)
    for field, col in columns.items():
        if field == col:
            continue
        if col not in out:
            raise SampleError(f"no {col!r} field (data.columns maps {field} to it; the sample has: "
                              f"{', '.join(map(str, rec)) or 'no fields'})")
        out[field] = out.pop(col)
    return out


def layout_of(rec: dict, declared: str = "auto") -> str:
    """llava | messages: the declared layout, or the one the sample's fields show."""
    if declared == "llava" or declared == "auto" and "conversations" in rec:
        if "conversations" not in rec:
            raise SampleError("no 'conversations' field (data.format: llava)")
        return "llava"
    if "messages" in rec:
        return "messages"
    if declared == "messages":
        raise SampleError("no 'messages' field (data.format: messages)")
    raise SampleError(f"no 'conversations' field (LLaVA layout) or 'messages' field (TRL / LLaMA-Factory layout); "
                      f"the sample has: {', '.join(map(str, rec)) or 'no fields'} (map other names with data.columns)")


def to_sample(rec, declared: str = "auto", columns: dict[str, str] | None = None):
    """The internal sample form of one record of any layout (a LLaVA record is returned as it is)."""
    if not isinstance(rec, dict):
        return rec  # check_record names the problem
    rec = rename_columns(rec, columns)
    if layout_of(rec, declared) == "llava":
        return rec
    return from_messages(rec)


def from_messages(rec: dict) -> dict:
    """A `messages` + `images` record -> {"id", "conversations", "images"} with `<image>` in the text."""
    messages = rec["messages"]
    if not isinstance(messages, list):
        raise SampleError(f"'messages' must be a list of turns, got {type(messages).__name__}")
    turns, inline = [], {"image": [], "video": []}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            turns.append(m)  # check_record names it
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = typed_text(content, i, inline)
        turns.append({"role": m.get("role"), "content": content})
    out = {"conversations": turns,
           "images": _media(rec.get("images", rec.get("image")), inline["image"], "images", "image"),
           "videos": _media(rec.get("videos", rec.get("video")), inline["video"], "videos", "video")}
    if _empty(out["videos"]):
        del out["videos"]
    if rec.get("id") is not None:
        out["id"] = rec["id"]
    return out


def _media(listed, inline: list, field: str, part: str):
    """A record's images (or videos): the listed ones, else those carried by the content parts; not both."""
    if _empty(listed):
        return inline
    if inline:
        raise SampleError(f"{field} both in the '{field}' field and inside the messages' {part} parts: give them once")
    return listed


def typed_text(content: list, turn: int, inline: dict[str, list]) -> str:
    """A typed content list -> text: parts joined by a newline, each image part as `<image>` and each video part
    as `<video>` (its own image / video, when it carries one, appended to `inline[kind]`)."""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise SampleError(f"turn {turn}: content part {j} (text): the text must be a string, got "
                                  f"{type(text).__name__}")
            parts.append(text)
        elif kind in ("image", "video"):
            parts.append(f"<{kind}>")
            if part.get(kind) is not None:
                inline[kind].append(part[kind])
        else:
            raise SampleError(f"turn {turn}: content part {j}: expected {{\"type\": \"text\" | \"image\" | "
                              f"\"video\", ...}}, "
                              f"got {part!r:.80}")
    return "\n".join(parts)


def _empty(images) -> bool:
    return images is None or isinstance(images, list) and not images


def _count(media) -> int:
    if media is None or isinstance(media, float) and math.isnan(media):
        return 0
    return len(media) if isinstance(media, list) else 1


def estimated_length(sample, video_tokens: int = 128) -> tuple[int, int]:
    """(words of the text + 128 per image + `video_tokens` per video, number of images and videos) of an
    internal-form sample: LLaVA's cheap length estimate for grouping by modality and length (no tokenizer, no
    image or video opened); a video sample counts as multimodal."""
    if not isinstance(sample, dict):
        return 0, 0
    words = 0
    for turn in sample.get("conversations") or []:
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if isinstance(text, str):
            words += len(text.split())
    n = _count(sample.get("images", sample.get("image")))
    v = _count(sample.get("videos", sample.get("video")))
    return words + 128 * n + video_tokens * v, n + v
