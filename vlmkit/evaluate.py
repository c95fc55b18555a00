"""Answer questions by greedy generation and score them against references."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .data.conversation import normalize
from .data.dataset import ConversationDataset
from .data.processor import collate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(s: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, single spaces."""
    s = _PUNCT.sub(" ", s.lower())
    return " ".join(_ARTICLES.sub(" ", s).split())


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
        new = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device),
                             b["pixel_values"].to(device), max_new_tokens=max_new_tokens, **layout, **gen_kwargs)
        out += [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def evaluate(model, path: str, image_folder: str = "", blank_images: bool = False, batch_size: int = 64,
             max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Accuracy on a LLaVA-format file whose last turn is the reference answer.

    Each sample's conversation up to its last assistant turn is the prompt; the generated answer
    is compared exactly (after stripping) and VQA-normalised. With `blank_images` every image is
    replaced by a uniform mean-colour image: what is still right is answered from the text alone.
    A sample's optional "type" field gives per-type accuracy.
    """
    processor = model.processor()
    ds = ConversationDataset(path, processor, image_folder)
    prompts, refs, types = [], [], []
    for i, rec in enumerate(ds.records):
        turns = normalize(rec["conversations"])
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError(f"{path}: sample {i} (id={rec.get('id', i)}): the last turn must be the reference answer")
        images = ds.images(rec)
        p = processor(rec["conversations"][:-1], images, add_generation_prompt=True)
        if blank_images:
            p["pixel_values"] = processor.transform.blank().expand_as(p["pixel_values"]).clone()
        prompts.append(p)
        refs.append(turns[-1]["content"].strip())
        types.append(rec.get("type", "all"))
    answers = generate_answers(model, prompts, batch_size, max_new_tokens, progress)
    exact = [a == r for a, r in zip(answers, refs)]
    norm = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, refs)]
    per_type = defaultdict(list)
    for t, e in zip(types, exact):
        per_type[t].append(e)
    return {
        "n": len(refs),
        "accuracy": sum(exact) / max(len(refs), 1),
        "accuracy_normalized": sum(norm) / max(len(refs), 1),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "examples": [{"ref": r, "answer": a} for r, a in list(zip(refs, answers))[:10]],
    }
