"""The high-resolution demo task: a detail too fine to survive one tile.

Each image is a white canvas of a random aspect (128x128, 128x64, 64x128, 128x96, 96x128) with one
~28 px square, plain, striped or checked with a 2 px period, somewhere on it. Resized to a single
encoder tile (32 px, a quarter of the canvas side) the three patterns become the same flat square
(the plain one has their mean colour): its colour and position survive, its pattern does not.
AnyRes tiles the canvas at full resolution, so the pattern stays visible. Questions: pattern
(needs the detail), colour and side (controls a single tile answers too). LLaVA-format JSON + PNGs.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from .demo import record, write_splits

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
PATTERNS = ("plain", "striped", "checked")
CANVASES = ((128, 128), (128, 64), (64, 128), (128, 96), (96, 128))  # (width, height); longest side 128
QUESTION_TYPES = ("pattern", "color", "side")
WHITE = (255, 255, 255)


def pattern_square(pattern: str, color, side: int) -> Image.Image:
    """A square patch: 2 px stripes or 2 px checks of `color` on white, or a plain square of their mean
    colour (50% `color`, 50% white), so that the three look the same once averaged over 4 px."""
    if pattern == "plain":
        return Image.new("RGB", (side, side), tuple((c + 255) // 2 for c in color))
    im = Image.new("RGB", (side, side), WHITE)
    px = im.load()
    for y in range(side):
        for x in range(side):
            on = (y // 2) % 2 == 0 if pattern == "striped" else ((y // 2) + (x // 2)) % 2 == 0
            if on:
                px[x, y] = color
    return im


def draw_scene(rng: random.Random, size: int = 28) -> tuple[Image.Image, dict]:
    w, h = rng.choice(CANVASES)
    im = Image.new("RGB", (w, h), WHITE)
    color, pattern = rng.choice(list(COLORS)), rng.choice(PATTERNS)
    s = rng.randint(size - 4, size + 4)
    x0, y0 = rng.randint(2, w - s - 2), rng.randint(2, h - s - 2)
    im.paste(pattern_square(pattern, COLORS[color], s), (x0, y0))
    side = "left" if x0 + s / 2 < w / 2 else "right"
    return im, {"color": color, "pattern": pattern, "side": side}


def questions(obj: dict) -> list[tuple[str, str, str]]:
    return [("pattern", "What pattern is the square?", obj["pattern"]),
            ("color", "What color is the square?", obj["color"]),
            ("side", "Is the square on the left or the right?", obj["side"])]


def make_highres_data(out_dir: str | Path, n_train: int = 2000, n_eval: int = 120, seed: int = 0,
                      size: int = 28) -> dict:
    """Write images/, captions.json (stage 1), train.json (stage 2: all questions of an image in one
    conversation) and eval.json (one question per type per eval image)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, evals = [], [], []
    for i in range(n_train + n_eval):
        im, obj = draw_scene(rng, size)
        name = f"images/{i:06d}.png"
        im.save(out / name)
        qs = questions(obj)
        if i < n_train:
            captions.append(record(f"cap{i}", name, [
                ("Describe the image.", f"a {obj['pattern']} {obj['color']} square on the {obj['side']}.")]))
            rng.shuffle(qs)
            train.append(record(f"qa{i}", name, [(q, a) for _, q, a in qs]))
        else:
            for t, q, a in qs:
                evals.append(record(f"ev{i}-{t}", name, [(q, a)], t))
    return write_splits(out, captions=captions, train=train, eval=evals)
