"""The high-resolution demo task: a detail too fine to survive one tile.

Each image is a white canvas of 128x128, 128x64 or 64x128 px with one square, plain, striped or checked
in 1 px bands (a 2 px period), near the outer edge of its left or right half at a random height. Padded to
a square and resized to one 64 px encoder tile (half the canvas side), the three patterns become the
same flat square (the plain one has their mean colour; an exact 2x reduction averages each band with
its neighbour): its colour and side survive, its pattern does not. Tiling at full resolution (every
canvas is a whole number of 64 px tiles) keeps the pattern visible. Questions: pattern (needs the
detail), colour and side (controls that one tile answers too). LLaVA-format JSON + PNGs.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from .demo import record, write_splits

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
PATTERNS = ("plain", "striped", "checked")
CANVASES = ((128, 128), (128, 64), (64, 128))  # (width, height): 2x2, 1x2, 2x1 tiles of 64 px
QUESTION_TYPES = ("pattern", "color", "side")
SIDES = ("left", "right")
FILL = (0.6, 0.75)
BAND = 1
WHITE = (255, 255, 255)


def pattern_square(pattern: str, color, side: int, band: int = BAND) -> Image.Image:
    """A square patch: stripes or checks `band` px wide of `color` on white, or a plain square of their mean
    colour (50% `color`, 50% white), so that the three look the same once averaged over 2 * band px."""
    if pattern == "plain":
        return Image.new("RGB", (side, side), tuple((c + 255) // 2 for c in color))
    im = Image.new("RGB", (side, side), WHITE)
    px = im.load()
    for y in range(side):
        for x in range(side):
            on = (y // band) % 2 == 0 if pattern == "striped" else ((y // band) + (x // band)) % 2 == 0
            if on:
                px[x, y] = color
    return im


def draw_scene(rng: random.Random, fill: tuple[float, float] = FILL) -> tuple[Image.Image, dict]:
    """A canvas with one patterned square near the outer edge of its left or right half (2-6 px from the
    canvas edge), at a random height. Its side is `fill` (min, max) of the half's width: 38-48 px on a
    128 px wide canvas, 19-24 on 64. Near the edge, the square sits at different patch columns of its
    tile for left and right (a tile's own position embeddings tell them apart, not only the base tile's)."""
    w, h = rng.choice(CANVASES)
    im = Image.new("RGB", (w, h), WHITE)
    color, pattern, side = rng.choice(list(COLORS)), rng.choice(PATTERNS), rng.choice(SIDES)
    s = rng.randint(int(w // 2 * fill[0]), int(w // 2 * fill[1]))
    margin = rng.randint(2, 6)
    x0 = margin if side == "left" else w - s - margin
    y0 = rng.randint(2, h - s - 2)
    im.paste(pattern_square(pattern, COLORS[color], s), (x0, y0))
    return im, {"color": color, "pattern": pattern, "side": side}


def questions(obj: dict) -> list[tuple[str, str, str]]:
    return [("pattern", "What pattern is the square?", obj["pattern"]),
            ("color", "What color is the square?", obj["color"]),
            ("side", "Is the square on the left or the right?", obj["side"])]


def make_highres_data(out_dir: str | Path, n_train: int = 2000, n_eval: int = 120, seed: int = 0,
                      fill: tuple[float, float] = FILL) -> dict:
    """Write images/, captions.json (stage 1), train.json (stage 2: all questions of an image in one
    conversation) and eval.json (one question per type per eval image)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, evals = [], [], []
    for i in range(n_train + n_eval):
        im, obj = draw_scene(rng, fill)
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


def prepare(out: str | Path, n_train: int, n_eval: int = 120) -> dict:
    """The demo's data under out/data and its tokenizer under out/tokenizer (what the demo configs name)."""
    from .demo import corpus, train_tokenizer

    out = Path(out)
    paths = make_highres_data(out / "data", n_train=n_train, n_eval=n_eval, seed=0)
    train_tokenizer(corpus([paths["captions"], paths["train"], paths["eval"]]), out / "tokenizer")
    return paths
