"""Answer questions by greedy generation and score them against references."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .data.conversation import SampleError
from .data.dataset import ConversationDataset, VideoOptions
from .data.samples import check_record
from .data.processor import collate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"


def normalize_answer(s: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, number words as digits."""
    s = _PUNCT.sub(" ", s.lower())
    return " ".join(_NUMBERS.get(w, w) for w in _ARTICLES.sub(" ", s).split())


@torch.no_grad()
def generate_answers(model, prompts: list[dict], batch_size: int = 64, max_new_tokens: int = 16,
                     progress: bool = True, **gen_kwargs) -> list[str]:
    """prompts: processor outputs made with add_generation_prompt=True. Returns decoded answers."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        b = collate(prompts[i:i + batch_size], model.tokenizer.pad_token_id, padding_side="left")
        layout = {k: b[k] for k in ("image_sizes", "images_per_sample", "tiles_per_image") if k in b}
        if "pixel_values_videos" in b and b["frames_per_video"].numel():  # a batch holding video questions
            layout.update({k: b[k].to(device) if k == "pixel_values_videos" else b[k]
                           for k in ("pixel_values_videos", "frames_per_video", "videos_per_sample")})
        new = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device),
                             b["pixel_values"].to(device), max_new_tokens=max_new_tokens, **layout, **gen_kwargs)
        out += [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def evaluate(model, path: str, image_folder: str = "", blank_images: bool = False, batch_size: int = 64,
             max_new_tokens: int = 16, progress: bool = True, accelerator=None, limit: int | None = None,
             video: VideoOptions | None = None) -> dict:
    """Accuracy on a LLaVA-format file (or HF dataset) whose last turn is the reference answer.

    Each sample's conversation up to its last assistant turn is the prompt; the greedy answer is
    compared exactly (after stripping) and VQA-normalised (case, punctuation, articles, number words).
    With `blank_images` every image is replaced by a uniform mean-colour image: what is still right
    is answered from the text alone. A sample's optional "type" field gives per-type accuracy.
    With an `accelerator` of several processes, each answers a contiguous shard and all get the result.
    `limit`: only the first `limit` samples of the file (of the whole file, however many processes share them).
    A sample's `video` (file or folder of frames, `<video>` in the text) is sampled and decoded as training does,
    with `video` (VideoOptions: frames, fps, token budget through the model's count_video_tokens, time prompt).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    processor = model.processor()
    ds = ConversationDataset(path, processor, image_folder, video=video)
    n = len(ds.records) if limit is None else min(limit, len(ds.records))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    lo, hi = rank * n // world, (rank + 1) * n // world
    prompts, rows = [], []
    for i in range(lo, hi):
        rec = ds.records[i]
        sid = ds.sample_id(i)
        try:  # the checks training makes, then the prompt; an error names the file and the sample
            turns = check_record(rec)
            if turns[-1][0] != "assistant":
                raise SampleError("the last turn must be the reference answer")
            videos = ds.videos(rec)
            p = processor(ds.conversations(rec, videos)[:-1], ds.images(rec), add_generation_prompt=True,
                          videos=videos or None)
        except (SampleError, OSError, ValueError) as e:
            raise SampleError(f"{path}: sample {i} (id={sid}): {e}", getattr(e, "kind", "invalid_sample")) from None
        if blank_images:
            p["pixel_values"] = processor.blank_like(p["pixel_values"])
            if p.get("pixel_values_videos") is not None and len(p["pixel_values_videos"]):
                p["pixel_values_videos"] = processor.blank_like(p["pixel_values_videos"])
        prompts.append(p)
        rows.append({"index": i, "id": sid, "type": str(rec.get("type", "all")), "ref": turns[-1][1].strip()})
    answers = generate_answers(model, prompts, batch_size, max_new_tokens, progress and rank == 0)
    for r, a in zip(rows, answers):
        r.update(answer=a, exact=a == r["ref"], normalized=normalize_answer(a) == normalize_answer(r["ref"]))
    if world > 1:
        from accelerate.utils import gather_object

        rows = sorted(gather_object(rows), key=lambda r: r["index"])
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    per_type = defaultdict(list)
    for r in rows:
        per_type[r["type"]].append(r)
    n = max(len(rows), 1)
    return {
        "n": len(rows),
        "accuracy": sum(r["exact"] for r in rows) / n,
        "accuracy_normalized": sum(r["normalized"] for r in rows) / n,
        "per_type": {t: sum(r["exact"] for r in v) / len(v) for t, v in sorted(per_type.items())},
        "per_type_normalized": {t: sum(r["normalized"] for r in v) / len(v) for t, v in sorted(per_type.items())},
        "examples": [{"ref": r["ref"], "answer": r["answer"]} for r in rows[:10]],
        "samples": rows,
    }


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated setting (e.g. images / blank images), one column per question type."""
    types = sorted({t for res in results.values() for t in res["per_type"]})
    head = "| setting | n | exact | normalized | " + " | ".join(types) + " |"
    sep = "|" + "---|" * (4 + len(types))
    lines = [head, sep]
    for name, res in results.items():
        cells = [f"{res['per_type'].get(t, float('nan')):.3f}" for t in types]
        lines.append(f"| {name} | {res['n']} | {res['accuracy']:.3f} | {res['accuracy_normalized']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, dict], out_dir, stem: str = "eval") -> tuple[str, str]:
    """<stem>.json (every answer) and <stem>.md (the table) in out_dir."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown_table(results))
    return str(out / f"{stem}.json"), str(out / f"{stem}.md")
