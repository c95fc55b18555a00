"""The embedded demo: a procedural visual-question task, a tokenizer and tiny models, all built offline.

Images are small canvases with 1-3 coloured shapes, each in its own quadrant. Every question is
answerable from the picture alone (a shape is asked about only when the question singles it out),
and every question type appears in the held-out eval split. Written as LLaVA-format JSON + PNGs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUND = (255, 255, 255)
QUESTION_TYPES = ("count", "color", "shape", "position", "what")


def draw_scene(rng: random.Random, size: int, min_size: float = 0.55, max_size: float = 0.8,
               jitter: float = 1.0) -> tuple[Image.Image, list[dict]]:
    """A canvas with 1-3 shapes, each in its own quadrant. A shape's side is `min_size`..`max_size`
    of the quadrant; `jitter` (0..1) is how far it may wander from the quadrant's centre (0: centred,
    1: anywhere with a 1-pixel margin)."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    half = size // 2
    n = rng.randint(1, 3)
    objs = []
    for q in rng.sample(range(4), n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        s = rng.randint(int(half * min_size), int(half * max_size))
        free = half - s  # room around the shape inside its quadrant
        lo, hi = round(free / 2 - jitter * (free / 2 - 1)), round(free / 2 + jitter * (free / 2 - 1))
        x0 = (q % 2) * half + rng.randint(lo, max(lo, hi))
        y0 = (q // 2) * half + rng.randint(lo, max(lo, hi))
        box = (x0, y0, x0 + s, y0 + s)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=COLORS[color])
        objs.append({"color": color, "shape": shape, "where": QUADRANTS[q]})
    return im, objs


def questions(objs: list[dict]) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every question the scene answers unambiguously."""
    qs = [("count", "How many shapes are there?", NUMBERS[len(objs)])]
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            qs.append(("color", f"What color is the {o['shape']}?", o["color"]))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            qs.append(("shape", f"What shape is the {o['color']} one?", o["shape"]))
        if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objs) == 1:
            qs.append(("position", f"Where is the {o['color']} {o['shape']}?", o["where"]))
        qs.append(("what", f"What is in the {o['where']}?", f"{o['color']} {o['shape']}"))
    return qs


def caption(objs: list[dict]) -> str:
    return " and ".join(f"a {o['color']} {o['shape']} in the {o['where']}" for o in objs) + "."


def relocate(cfg, out: Path) -> None:
    """Point a demo run config's data files and tokenizer at `out` (where the demo writes them)."""
    for st in cfg.stages:
        st.data.path = str(out / "data" / Path(st.data.path).name)
    cfg.model.llm.tokenizer = str(out / "tokenizer")


def record(sid: str, image: str, turns: list[tuple[str, str]], qtype: str | None = None) -> dict:
    """A LLaVA-format sample: one image, then (question, answer) turns; `<image>` opens the first question."""
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    rec = {"id": sid, "image": image, "conversations": conv}
    return {"id": sid, "type": qtype, **rec} if qtype else rec


def write_splits(out: Path, **splits: list[dict]) -> dict[str, str]:
    """Each split as <out>/<name>.json; returns name -> path."""
    paths = {}
    for name, data in splits.items():
        with open(out / f"{name}.json", "w") as f:
            json.dump(data, f)
        paths[name] = str(out / f"{name}.json")
    return paths


def make_demo_data(out_dir: str | Path, n_train: int = 3000, n_eval: int = 150, size: int = 48,
                   seed: int = 0, jitter: float = 1.0, min_size: float = 0.55, max_size: float = 0.8) -> dict:
    """Write images/, captions.json (stage 1), train.json (stage 2, every question of an image in
    one conversation) and eval.json (one question per sample, each type for each eval image)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, evals = [], [], []
    for i in range(n_train + n_eval):
        im, objs = draw_scene(rng, size, min_size, max_size, jitter)
        name = f"images/{i:06d}.png"
        im.save(out / name)
        qs = questions(objs)
        if i < n_train:
            captions.append(record(f"cap{i}", name, [("Describe the image.", caption(objs))]))
            rng.shuffle(qs)
            train.append(record(f"qa{i}", name, [(q, a) for _, q, a in qs]))
        else:
            by_type = {}
            for t, q, a in qs:
                by_type.setdefault(t, []).append((q, a))
            for t in sorted(by_type):
                evals.append(record(f"ev{i}-{t}", name, [rng.choice(by_type[t])], t))
    return write_splits(out, captions=captions, train=train, eval=evals)


def prepare(out: str | Path, n_train: int, size: int, n_eval: int = 150) -> dict:
    """The demo's data under out/data and its tokenizer under out/tokenizer (what the demo configs name).
    Shapes sit centred in their quadrants (jitter 0): each fills the same patches wherever it is."""
    out = Path(out)
    paths = make_demo_data(out / "data", n_train=n_train, n_eval=n_eval, size=size, seed=0, jitter=0.0)
    train_tokenizer(corpus([paths["captions"], paths["train"], paths["eval"]]), out / "tokenizer")
    return paths


def corpus(path_list: list[str]) -> list[str]:
    texts = []
    for p in path_list:
        for rec in json.load(open(p)):
            texts += [t["value"] for t in rec["conversations"]]
    return texts


def train_tokenizer(texts: list[str], out_dir: str | Path, extra: list[str] = ()) -> str:
    """A word-level tokenizer trained in-process on the demo's texts and template words; saved with
    save_pretrained, so the model loads it through the same path as a hub tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.conversation import VICUNA_SYSTEM

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.train_from_iterator(list(texts) + [VICUNA_SYSTEM, "USER: ASSISTANT:"] + list(extra), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return str(out_dir)
