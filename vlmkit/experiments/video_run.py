"""What recipes/llava_video.py needs around training: the demo's clips and tokenizer (`prepare`), and its metrics
(`video_demo_metrics`): accuracy per question type and overall on the held-out clips with their frames in order,
shuffled, and one frame repeated (vlmkit/experiments/video_demo.py makes the three variants of the same clips).

Answers come from `vlmkit.evaluate.evaluate` (greedy generation, what `vlmkit eval` runs) with each clip decoded
as the last training stage decodes it (its `VideoOptions`), scored VQA-normalised.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..data.dataset import VideoOptions
from ..evaluate import evaluate
from .demo import corpus, train_tokenizer
from .video_demo import make_video_demo

VARIANT_FILES = {"ordered": "eval.json", "shuffled": "eval_shuffled.json", "one": "eval_one.json"}
"""Eval variant -> its file under the demo's data folder."""


def prepare(out: str | Path, n_train: int, n_eval: int, size: int, n_frames: int, seed: int = 0) -> dict:
    """The demo's clips and splits under out/data and a word-level tokenizer (every word of the splits and the
    template, and `<video>` as one special token) under out/tokenizer: what the demo config names."""
    from ..models.llm import load_tokenizer

    out = Path(out)
    paths = make_video_demo(out / "data", n_train=n_train, n_eval=n_eval, size=size, n_frames=n_frames, seed=seed)
    tok_dir = train_tokenizer(corpus([paths["train"], paths["eval"]]), out / "tokenizer")
    load_tokenizer(tok_dir, "<video>").save_pretrained(tok_dir)  # <video> as one special token
    return paths


def video_demo_metrics(model, data_dir: str | Path, stage_metrics: list[dict], t0: float,
                       video: VideoOptions) -> dict:
    """metrics.json of the video demo: accuracy (overall, per type) in order / shuffled / one frame, a few
    example answers in order, and the training figures of the stages."""
    data_dir = Path(data_dir)
    m: dict = {}
    for variant, name in VARIANT_FILES.items():
        res = evaluate(model, str(data_dir / name), str(data_dir), progress=False, video=video)
        m[f"accuracy_{variant}"] = res["accuracy_normalized"]
        m[f"accuracy_{variant}_per_type"] = res["per_type_normalized"]
        m["eval_questions"] = res["n"]
        if variant == "ordered":
            m["examples"] = res["examples"][:8]
    seconds = sum(s["seconds"] for s in stage_metrics)
    m.update(train_samples_per_second=sum(s["samples"] for s in stage_metrics) / max(seconds, 1e-9),
             stages=stage_metrics, final_loss=stage_metrics[-1]["final_loss"],
             wall_seconds=round(time.perf_counter() - t0, 1))
    return m
