"""The embedded video demo: short procedural clips whose questions need time (several frames, in order).

Each clip (`size` x `size` pixels, `n_frames` frames at `rate` fps, written as .mp4 with PyAV) asks one question:

- `horizontal` / `vertical`: "Does the red square move left or right?" A shape moves in a straight line.
- `first`: "Which appears first, the red square or the blue circle? Answer with its colour." (red) Two shapes, each
  visible for the same number of frames, start at different frames.
- `bounces`: "How many times does the green circle bounce off a wall?" (zero / one / two) A shape moves along one
  axis and reflects off the canvas edges; the answer is the number of reversals of its motion between frames.

By construction the first three types are exactly at chance from one frame or from the frames out of order: every
clip's time-reversed twin (the same set of frames) is equally likely and has the other answer (a path A -> B and
B -> A; appearance intervals that are mirror images in time). `bounces` needs several frames in order.

`make_video_demo` writes clips/*.mp4, train.json and eval.json (LLaVA-Video format: `"video"` and `<video>` in the
first question, and `type` in eval records), and the two control variants of eval for the order-matters metric:
eval_shuffled.json (each clip's frames in a seeded random order, clips_shuffled/) and eval_one.json (one frame
drawn at random, repeated `n_frames` times so the token count does not change, clips_one/). The same frames are in
every variant; `variant_frames` makes them in memory.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..extras import require

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
NUMBERS = ("zero", "one", "two")
QUESTION_TYPES = ("horizontal", "vertical", "first", "bounces")
BACKGROUND = (255, 255, 255)
VARIANTS = ("ordered", "shuffled", "one")
"""The eval variants: frames in order, in a random order, one frame repeated."""


def draw(size: int, objs: list[tuple[str, str, float, float, int]]) -> np.ndarray:
    """One frame [size, size, 3] uint8: objs = (color, shape, x, y, side) with (x, y) the top-left corner."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    for color, shape, x, y, s in objs:
        box = (x, y, x + s - 1, y + s - 1)
        if shape == "square":
            d.rectangle(box, fill=COLORS[color])
        elif shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        else:
            d.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=COLORS[color])
    return np.asarray(im)


def _thing(rng: random.Random) -> tuple[str, str]:
    return rng.choice(sorted(COLORS)), rng.choice(SHAPES)


def clip_move(rng: random.Random, size: int, n: int, axis: str) -> tuple[list[np.ndarray], str, str]:
    """A shape moving in a straight line along `axis` (horizontal | vertical): (frames, question, answer)."""
    color, shape = _thing(rng)
    side = max(4, size // 5)
    room = size - side
    a, b = sorted(rng.sample(range(room + 1), 2))
    while b - a < room // 2:  # travel at least half the canvas: the motion is plain to see
        a, b = sorted(rng.sample(range(room + 1), 2))
    forward = rng.random() < 0.5
    start, end = (a, b) if forward else (b, a)
    other = rng.randrange(room + 1)
    frames = []
    for i in range(n):
        p = round(start + (end - start) * i / (n - 1))
        x, y = (p, other) if axis == "horizontal" else (other, p)
        frames.append(draw(size, [(color, shape, x, y, side)]))
    words = ("left", "right") if axis == "horizontal" else ("up", "down")
    q = f"Does the {color} {shape} move {words[0]} or {words[1]}? Answer with one word."
    return frames, q, words[1] if forward else words[0]


def clip_first(rng: random.Random, size: int, n: int) -> tuple[list[np.ndarray], str, str]:
    """Two shapes, each visible for `length` frames from different starts: which appears first."""
    (c1, s1), (c2, s2) = _thing(rng), _thing(rng)
    while s2 == s1 or c2 == c1:
        c2, s2 = _thing(rng)
    length = max(2, n // 2)
    a, b = sorted(rng.sample(range(n - length + 1), 2))  # (a, b) <-> (n-length-b, n-length-a): time reversal
    side = max(4, size // 4)
    half = size // 2
    x1, x2 = (rng.randrange(half - side + 1), half + rng.randrange(half - side + 1))
    if rng.random() < 0.5:
        x1, x2 = x2, x1
    y1, y2 = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
    frames = []
    for i in range(n):
        objs = [(c1, s1, x1, y1, side)] if a <= i < a + length else []
        objs += [(c2, s2, x2, y2, side)] if b <= i < b + length else []
        frames.append(draw(size, objs))
    named = [f"the {c1} {s1}", f"the {c2} {s2}"]
    rng.shuffle(named)
    # answered with the colour, which the tokens of a frame show plainly (the shape's outline is finer than a
    # pooled token); the shape word as the answer stayed at 0.60 in order in the full demo (README's Video demo)
    return frames, f"Which appears first, {named[0]} or {named[1]}? Answer with its colour.", c1


def reflect(p: float, room: int) -> float:
    """`p` folded into [0, room] by reflections off both ends."""
    p = p % (2 * room)
    return p if p <= room else 2 * room - p


def bounce_path(rng: random.Random, room: int, n: int, target: int) -> list[int]:
    """Positions (ints in [0, room]) of a shape reflecting off both ends that hits a wall exactly `target` times
    and whose motion between frames reverses as many times, never standing still, at least 3 px a frame where the
    room allows a bounce-free path that fast (the demo's 26 px over 8 frames does): a slow reversal moves the
    shape by a fraction of a pooled token (8 px). Measured in the full demo: bounces 0.42 in order from 1.5 px a
    frame (with the older `first`), 0.44 from 2.5 px, 0.58 from 3 px (README's Video demo)."""
    fastest = 2.0 * room / max(1, n - 1)
    slowest = min(3.0, 0.9 * room / max(1, n - 1))  # below room / (n - 1): zero bounces stays possible
    for _ in range(10_000):
        x0, v = rng.uniform(0, room), rng.uniform(slowest, fastest) * rng.choice((-1, 1))
        path = [round(reflect(x0 + v * i, room)) for i in range(n)]
        steps = np.diff(path)
        seen = int(np.sum(np.sign(steps[1:]) != np.sign(steps[:-1])))
        ends = sorted((x0, x0 + v * (n - 1)))
        hits = int(np.floor(ends[1] / room) - np.floor(ends[0] / room))  # walls crossed by the unfolded path
        if np.all(steps != 0) and seen == hits == target:
            return path
    raise ValueError(f"no path with {target} bounce(s) in {n} frames over {room} pixels: use more frames")


def clip_bounces(rng: random.Random, size: int, n: int) -> tuple[list[np.ndarray], str, str]:
    """A shape moving along one axis, reflecting off the edges: how many times it bounces (zero / one / two)."""
    color, shape = _thing(rng)
    side = max(4, size // 5)
    room = size - side
    target = rng.randrange(len(NUMBERS))
    path = bounce_path(rng, room, n, target)
    other, horizontal = rng.randrange(room + 1), rng.random() < 0.5
    frames = [draw(size, [(color, shape, p, other, side) if horizontal else (color, shape, other, p, side)])
              for p in path]
    return frames, f"How many times does the {color} {shape} bounce off a wall? Answer with one word.", \
        NUMBERS[target]


def make_clip(rng: random.Random, qtype: str, size: int, n: int) -> tuple[list[np.ndarray], str, str]:
    """(frames, question, answer) of one clip of question type `qtype`."""
    if qtype in ("horizontal", "vertical"):
        return clip_move(rng, size, n, qtype)
    if qtype == "first":
        return clip_first(rng, size, n)
    if qtype == "bounces":
        return clip_bounces(rng, size, n)
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def codec() -> str:
    """The encoder used: libx264 when the PyAV wheel has it, else mpeg4."""
    av = require("av", "video", "writing the video demo")
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path: str | Path, frames: list[np.ndarray], rate: int = 4) -> None:
    """Frames [H, W, 3] uint8 (even H, W) as an H.264 (or MPEG-4) .mp4 at `rate` fps, nearly lossless."""
    av = require("av", "video", "writing the video demo")
    name = codec()
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        s = out.add_stream(name, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "8"} if name == "libx264" else {"qscale": "2"}
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(s.encode())


def variant_frames(frames: list, variant: str, rng: random.Random) -> list:
    """The frames of an eval variant: `ordered` (as they are), `shuffled` (a random order other than the original
    when there are 2+ distinct frames), `one` (one frame drawn at random, repeated len(frames) times)."""
    if variant == "ordered":
        return list(frames)
    if variant == "one":
        return [frames[rng.randrange(len(frames))]] * len(frames)
    if variant != "shuffled":
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    order = list(range(len(frames)))
    for _ in range(100):
        rng.shuffle(order)
        if order != sorted(order):
            break
    return [frames[i] for i in order]


def record(sid: str, video: str, question: str, answer: str, qtype: str | None = None) -> dict:
    """A LLaVA-Video sample: `<video>` opens the question."""
    rec = {"id": sid, "video": video,
           "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
    return {**rec, "type": qtype} if qtype else rec


def make_video_demo(out_dir: str | Path, n_train: int = 400, n_eval: int = 80, size: int = 32, n_frames: int = 8,
                    rate: int = 4, seed: int = 0) -> dict[str, str]:
    """Write the demo's clips and JSON splits under `out_dir` (module docstring); question types cycle, so each
    is a quarter of each split and balanced in its answers in expectation. Returns split name -> JSON path."""
    if size % 2 or size < 16:
        raise ValueError(f"size must be even and >= 16 (H.264 wants even sides), got {size}")
    if n_frames < 4:
        raise ValueError(f"n_frames must be >= 4, got {n_frames}")
    out = Path(out_dir)
    for d in ("clips", "clips_shuffled", "clips_one"):
        (out / d).mkdir(parents=True, exist_ok=True)
    rng, vrng = random.Random(seed), random.Random(seed + 1)
    splits: dict[str, list] = {"train": [], "eval": [], "eval_shuffled": [], "eval_one": []}
    for i in range(n_train + n_eval):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        frames, q, a = make_clip(rng, qtype, size, n_frames)
        name = f"{i:06d}.mp4"
        write_mp4(out / "clips" / name, frames, rate)
        if i < n_train:
            splits["train"].append(record(f"v{i}", f"clips/{name}", q, a))
            continue
        splits["eval"].append(record(f"ev{i}", f"clips/{name}", q, a, qtype))
        for variant in ("shuffled", "one"):
            write_mp4(out / f"clips_{variant}" / name, variant_frames(frames, variant, vrng), rate)
            splits[f"eval_{variant}"].append(record(f"ev{i}-{variant}", f"clips_{variant}/{name}", q, a, qtype))
    paths = {}
    for split, recs in splits.items():
        paths[split] = str(out / f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(recs, f)
    return paths
