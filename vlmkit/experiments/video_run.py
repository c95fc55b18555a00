"""What recipes/llava_video.py needs around training: the demo's clips and tokenizer (`prepare`), and its metrics
(`video_demo_metrics`): accuracy per question type and overall on the held-out clips with their frames in order,
shuffled, and one frame repeated (vlmkit/experiments/video_demo.py makes the three variants of the same clips).

Answers come from the model's greedy `generate` over the processor's prompt, with each clip decoded by
`vlmkit.data.video.load_video` exactly as training decodes it (`data.max_frames` / `data.fps` of the last stage),
and are scored VQA-normalised as `vlmkit eval` scores them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data.processor import collate
from ..data.video import load_video
from ..evaluate import normalize_answer
from .demo import corpus, train_tokenizer
from .video_demo import make_video_demo

VARIANT_FILES = {"ordered": "eval.json", "shuffled": "eval_shuffled.json", "one": "eval_one.json"}
"""Eval variant -> its file under the demo's data folder."""
VIDEO_KEYS = ("pixel_values_videos", "frames_per_video", "videos_per_sample")


def prepare(out: str | Path, n_train: int, n_eval: int, size: int, n_frames: int, seed: int = 0) -> dict:
    """The demo's clips and splits under out/data and a word-level tokenizer (every word of the splits and the
    template, and `<video>` as one special token) under out/tokenizer: what the demo config names."""
    from ..models.llm import load_tokenizer

    out = Path(out)
    paths = make_video_demo(out / "data", n_train=n_train, n_eval=n_eval, size=size, n_frames=n_frames, seed=seed)
    tok_dir = train_tokenizer(corpus([paths["train"], paths["eval"]]), out / "tokenizer")
    load_tokenizer(tok_dir, "<video>").save_pretrained(tok_dir)  # <video> as one special token
    return paths


@torch.no_grad()
def answer_videos(model, records: list[dict], folder: str, max_frames: int, fps: float | None = None,
                  batch_size: int = 32, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to each record's question (its conversation up to the last turn) about its video."""
    model.eval()
    processor = model.processor()
    prompts = [processor(r["conversations"][:-1], [], add_generation_prompt=True,
                         videos=[load_video(r["video"], folder, max_frames=max_frames, fps=fps)]) for r in records]
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        b = collate(prompts[i:i + batch_size], model.tokenizer.pad_token_id, padding_side="left")
        videos = {k: b[k].to(device) for k in VIDEO_KEYS if k in b}
        new = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device), None,
                             max_new_tokens=max_new_tokens, **videos)
        out += [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def score(records: list[dict], answers: list[str]) -> dict:
    """Accuracy overall and per question type (`type` of each record), VQA-normalised."""
    per_type: dict[str, list[bool]] = {}
    for r, a in zip(records, answers):
        ok = normalize_answer(a) == normalize_answer(r["conversations"][-1]["value"])
        per_type.setdefault(str(r.get("type", "all")), []).append(ok)
    n = max(1, len(records))
    return {"accuracy": sum(sum(v) for v in per_type.values()) / n,
            "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())}, "n": len(records)}


def video_demo_metrics(model, data_dir: str | Path, stage_metrics: list[dict], t0: float, max_frames: int,
                       fps: float | None = None) -> dict:
    """metrics.json of the video demo: accuracy (overall, per type) in order / shuffled / one frame, a few
    example answers in order, and the training figures of the stages."""
    data_dir = Path(data_dir)
    m: dict = {}
    for variant, name in VARIANT_FILES.items():
        records = json.loads((data_dir / name).read_text())
        answers = answer_videos(model, records, str(data_dir), max_frames, fps)
        res = score(records, answers)
        m[f"accuracy_{variant}"] = res["accuracy"]
        m[f"accuracy_{variant}_per_type"] = res["per_type"]
        m["eval_questions"] = res["n"]
        if variant == "ordered":
            m["examples"] = [{"question": r["conversations"][0]["value"], "ref": r["conversations"][-1]["value"],
                              "answer": a} for r, a in zip(records[:8], answers)]
    seconds = sum(s["seconds"] for s in stage_metrics)
    m.update(train_samples_per_second=sum(s["samples"] for s in stage_metrics) / max(seconds, 1e-9),
             stages=stage_metrics, final_loss=stage_metrics[-1]["final_loss"],
             wall_seconds=round(time.perf_counter() - t0, 1))
    return m
