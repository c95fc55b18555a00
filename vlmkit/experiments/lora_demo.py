"""The LoRA recipe's demo data (recipes/lora_finetune.py with no --data): a question type the llava15 demo
model never saw, and replay of the base task's own conversations."""
from __future__ import annotations

import json
import random
from pathlib import Path

NEW_TYPE = "count_color"  # "How many red shapes are there?": never asked in the llava15 demo


def make_new_type_data(out: Path, n_train: int, n_eval: int, size: int, seed: int = 1) -> tuple[str, str]:
    """Fresh scenes with a question type the base model never saw; words all in the demo's vocabulary."""
    from vlmkit.experiments.demo import NUMBERS, draw_scene, record, write_splits

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": [], "eval": []}
    for i in range(n_train + n_eval):
        im, objs = draw_scene(rng, size)
        name = f"images/{i:06d}.png"
        im.save(out / name)
        colors = sorted({o["color"] for o in objs})
        split = "train" if i < n_train else "eval"
        for color in (colors if split == "train" else [rng.choice(colors)]):
            n = sum(o["color"] == color for o in objs)
            splits[split].append(record(f"{split}{i}-{color}", name,
                                        [(f"How many {color} shapes are there?", NUMBERS[n])], NEW_TYPE))
    paths = write_splits(out, **splits)
    return paths["train"], paths["eval"]


def replay(train_path: Path, base_train: Path, n: int) -> None:
    """Mix n of the base task's own conversations into the new data (images referenced by absolute
    path), so the adapters learn the new question type without forgetting the old ones."""
    if not base_train.exists():
        return
    recs = json.loads(train_path.read_text())
    for r in json.loads(base_train.read_text())[:n]:
        recs.append(dict(r, image=str((base_train.parent / r["image"]).resolve())))
    random.Random(0).shuffle(recs)
    train_path.write_text(json.dumps(recs))
