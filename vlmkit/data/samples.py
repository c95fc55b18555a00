"""The shape of one LLaVA-format sample, checked before anything is built from it.

Training (`ConversationDataset.__getitem__`), check-data (which runs that same code) and evaluation call
`check_record` first, so a sample of the wrong shape (a turn that is a string, `conversations` that is a
string, `image: 123`, a NaN where text belongs) is a `SampleError` with a kind, counted or raised by the
same rules as every other bad sample, never an AttributeError deep inside the template code.

Errors (training raises them, or skips the sample under `on_bad_sample: skip`):
    invalid_sample   a field of the wrong type, an unknown role, no conversations
    turn_order       the first turn is the assistant's, two turns of one side in a row, a system turn
                     after the first: the template would render a prompt the model never meets at inference
                     (two user turns leave a dangling `ASSISTANT:` between them)
    empty_answer     an assistant turn with no text: it would teach the model to end its answer at once
Notes (kept for training, listed by check-data): `record_notes`.
"""
from __future__ import annotations

import math

from .conversation import ROLES, SampleError

IMAGE_FIELDS = ("image", "images")
VIDEO_FIELDS = ("video", "videos")


def _describe(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (float)"
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 60 else text


def _turn(turn, i: int) -> tuple[str, str]:
    """(role, content) of turn i, or a SampleError saying what is wrong with it."""
    if not isinstance(turn, dict):
        raise SampleError(f"turn {i}: expected an object with from/value (or role/content), got "
                          f"{type(turn).__name__} {_describe(turn)}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if not isinstance(role, str) or role not in ROLES:
        raise SampleError(f"turn {i}: unknown role {_describe(role)} (known: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise SampleError(f"turn {i} ({role}): the text must be a string, got {type(content).__name__} "
                          f"{_describe(content)}")
    return ROLES[role], content


def _image_entry(item, k: int) -> None:
    from PIL import Image

    if isinstance(item, str):
        if not item.strip():
            raise SampleError(f"image {k}: an empty path")
        return
    if isinstance(item, dict) and (isinstance(item.get("path"), str) and item["path"].strip()
                                   or isinstance(item.get("bytes"), (bytes, bytearray)) and item["bytes"]):
        return
    if isinstance(item, Image.Image):
        return
    raise SampleError(f"image {k}: expected a path (string), {{\"path\"}} / {{\"bytes\"}} or an image, got "
                      f"{type(item).__name__} {_describe(item)}")


def _video_entry(item, k: int) -> None:
    path = item.get("path") if isinstance(item, dict) else item
    if not isinstance(path, str) or not path.strip():
        raise SampleError(f"video {k}: expected a path (string: a video file or a folder of frames) or "
                          f"{{\"path\"}}, got {type(item).__name__} {_describe(item)}")


def check_record(rec) -> list[tuple[str, str]]:
    """Raise SampleError (with its kind) when the sample's shape is wrong; return its turns as (role, content)."""
    if not isinstance(rec, dict):
        raise SampleError(f"expected a JSON object, got {type(rec).__name__} {_describe(rec)}")
    sid = rec.get("id")
    if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
        raise SampleError(f"id must be a string or an integer, got {type(sid).__name__} {_describe(sid)}")
    if "conversations" not in rec:
        raise SampleError("no 'conversations' field")
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise SampleError(f"'conversations' must be a list of turns, got {type(conv).__name__} {_describe(conv)}")
    if not conv:
        raise SampleError("'conversations' is empty")
    for key in IMAGE_FIELDS:
        if key in rec and rec[key] is not None:
            value = rec[key]
            for k, item in enumerate(value if isinstance(value, list) else [value]):
                _image_entry(item, k)
    for key in VIDEO_FIELDS:
        if key in rec and rec[key] is not None:
            value = rec[key]
            for k, item in enumerate(value if isinstance(value, list) else [value]):
                _video_entry(item, k)
    turns = [_turn(t, i) for i, t in enumerate(conv)]
    check_turn_order(turns)
    return turns


def check_turn_order(turns: list[tuple[str, str]]) -> None:
    """An optional first system turn, then user and assistant turns alternating, the user first; no empty answer."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    expected = "user"
    for i, (role, content) in enumerate(body, start=len(turns) - len(body)):
        if role == "system":
            raise SampleError(f"turn {i}: a system turn after the first turn", "turn_order")
        if role != expected:
            if i == len(turns) - len(body):
                raise SampleError(f"turn {i}: the conversation starts with the assistant (no question to answer)",
                                  "turn_order")
            raise SampleError(f"turns {i - 1} and {i}: two {role} turns in a row (the template would leave "
                              f"{'an empty answer' if role == 'user' else 'two answers'} between them)", "turn_order")
        if role == "assistant" and not content.strip():
            raise SampleError(f"turn {i}: an empty answer (training would teach the model to stop at once)",
                              "empty_answer")
        expected = "assistant" if role == "user" else "user"


def record_notes(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Notes on a valid sample's text that training accepts: a last question without an answer."""
    if len(turns) > 1 and turns[-1][0] == "user":
        return [("unanswered_last_turn", f"turn {len(turns) - 1}: the last human turn has no answer; "
                                         f"training leaves it out")]
    return []
