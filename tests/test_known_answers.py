"""Tests that a wrong implementation cannot pass (issue 16, item 14): figures computed by hand, settings read on
CPU, generation that is free to stop.

- Evaluation with a scripted model whose answers are known: exact and normalised accuracy, per type, and the
  blank-image setting, against figures worked out below (the random test model never answers right, so its
  scores exercise no scoring at all).
- QLoRA: the quantization settings reach transformers (BitsAndBytesConfig, dtype) and freeze the base, on CPU.
- Export: generation without a forced length, from a model made to end its answer early, so the exported end
  token decides where the native model stops.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ENCODER_CASES, LLM_KW, build_for_export, model_config
from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig
from vlmkit.evaluate import evaluate, markdown_table

# ---- evaluation with known answers ------------------------------------------------------------------------
COLOR_Q, COUNT_Q, SHAPE_Q = "What color is the shape?", "How many shapes are there?", "Describe the image."
# id, type, question, reference, the scripted answer when it sees the image
SCRIPT = [
    ("q0", "color", COLOR_Q, "red", "red"),            # exact, normalised
    ("q1", "color", COLOR_Q, "blue", "Blue."),         # normalised only (case, punctuation)
    ("q2", "color", COLOR_Q, "green", "yellow"),       # wrong
    ("q3", "count", COUNT_Q, "2", "two"),              # normalised only (number word)
    ("q4", "count", COUNT_Q, "3", "3"),                # exact
    ("q5", "count", COUNT_Q, "1", "4"),                # wrong
    ("q6", "shape", SHAPE_Q, "a circle", "the circle"),  # normalised only (articles)
]
BLIND = {COLOR_Q: "red", COUNT_Q: "2", SHAPE_Q: "a circle"}  # the answer from the question alone (blank image)
# by hand: exact q0 q4 = 2/7; normalised q0 q1 q3 q4 q6 = 5/7; per type exact color 1/3, count 1/3, shape 0/1,
# normalised color 2/3, count 2/3, shape 1/1. Blank images: q0 (red), q3 (2), q6 (a circle) right: 3/7 exact and
# normalised; per type color 1/3, count 1/3, shape 1/1.
COLORS = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30), (30, 200, 200), (200, 30, 200), (90, 90, 90)]


class ScriptedModel(nn.Module):
    """Answers from a script: which sample a row is comes from its image's colour, its question from its prompt;
    a blank image gets the question's blind answer. `batch_decode` turns answer ids back into strings."""

    def __init__(self, processor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self._processor = processor
        self.table = []
        self.tokenizer = SimpleNamespace(pad_token_id=processor.tokenizer.pad_token_id,
                                         batch_decode=lambda ids, skip_special_tokens=True:
                                         [self.table[int(i)] for i in ids[:, 0]])
        self.calls = []

    def processor(self):
        return self._processor

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens=16, **layout):
        t = self._processor.transform
        mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
        out = []
        self.calls.append(input_ids.shape[0])
        for r in range(input_ids.shape[0]):
            prompt = self._processor.tokenizer.decode(input_ids[r][attention_mask[r].bool()])
            question = next(q for q in BLIND if q.split()[0] in prompt and q.split()[-1].rstrip("?.") in prompt)
            px = pixel_values[r]  # one tile per sample, [3, T, T]
            if px.abs().max() < 0.05:  # the blank image (the mean colour: zero once normalised)
                answer = BLIND[question]
            else:
                rgb = ((px * std + mean) * 255).mean(dim=(1, 2))
                k = int(np.argmin([float(((rgb - torch.tensor(c, dtype=torch.float)) ** 2).sum()) for c in COLORS]))
                assert SCRIPT[k][2] == question
                answer = SCRIPT[k][4]
            self.table.append(answer)
            out.append(len(self.table) - 1)
        return torch.tensor(out).view(-1, 1)


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("known")
    recs = []
    for (sid, typ, q, ref, _), color in zip(SCRIPT, COLORS):
        Image.new("RGB", (16, 16), color).save(d / f"{sid}.png")
        recs.append({"id": sid, "type": typ, "image": f"{sid}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ref}]})
    (d / "eval.json").write_text(json.dumps(recs))
    return str(d / "eval.json")


def test_evaluation_scores_known_answers(processor, scripted_file):
    model = ScriptedModel(processor)
    res = evaluate(model, scripted_file, batch_size=3, progress=False)  # batches of 3, left-padded
    assert model.calls == [3, 3, 1]
    assert [r["answer"] for r in res["samples"]] == [s[4] for s in SCRIPT]
    assert [r["exact"] for r in res["samples"]] == [True, False, False, False, True, False, False]
    assert [r["normalized"] for r in res["samples"]] == [True, True, False, True, True, False, True]
    assert res["n"] == 7 and res["accuracy"] == pytest.approx(2 / 7) and res["accuracy_normalized"] == pytest.approx(5 / 7)
    assert res["per_type"] == pytest.approx({"color": 1 / 3, "count": 1 / 3, "shape": 0.0})
    assert res["per_type_normalized"] == pytest.approx({"color": 2 / 3, "count": 2 / 3, "shape": 1.0})

    blank = evaluate(ScriptedModel(processor), scripted_file, blank_images=True, progress=False)
    assert [r["answer"] for r in blank["samples"]] == [BLIND[s[2]] for s in SCRIPT]
    assert blank["accuracy"] == pytest.approx(3 / 7) and blank["accuracy_normalized"] == pytest.approx(3 / 7)
    assert blank["per_type"] == pytest.approx({"color": 1 / 3, "count": 1 / 3, "shape": 1.0})
    table = markdown_table({"images": res, "blank images": blank})
    assert "| images | 7 | 0.286 | 0.714 | 0.333 | 0.333 | 0.000 |" in table
    assert "| blank images | 7 | 0.429 | 0.429 | 0.333 | 0.333 | 1.000 |" in table


# ---- QLoRA settings on CPU ------------------------------------------------------------------------------------
QLORA_KW = dict(LLM_KW, hidden_size=64, intermediate_size=128)


@pytest.mark.parametrize("source", ["random", "path"])
@pytest.mark.parametrize("quant,want", [
    ({}, ("nf4", torch.bfloat16, True)),
    ({"quant_type": "fp4", "compute_dtype": "float16", "double_quant": False}, ("fp4", torch.float16, False)),
])
def test_qlora_settings_reach_transformers(source, quant, want, tok_dir, llm_dir, monkeypatch):
    """What `llm.quantization` asks for is what transformers is given (a BitsAndBytesConfig and the compute dtype),
    and the quantized base is frozen; checked on CPU by standing in for the CUDA-only loading step."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vlmkit import VLM
    from vlmkit import llm as llm_mod

    monkeypatch.setattr(llm_mod, "check_quantization_support", lambda: None)
    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def loading(cls, path, *a, **k):
        seen.append(dict(k))
        k.pop("quantization_config", None)  # bitsandbytes' 4-bit layers need CUDA: load plain weights instead
        return real(cls, path, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(loading))
    llm = (LLMConfig(config=dict(QLORA_KW), tokenizer=tok_dir, quantization=quant) if source == "random"
           else LLMConfig(path=llm_dir, quantization=quant))
    cfg = ModelConfig(encoder=EncoderConfig(name="clip", config=dict(ENCODER_CASES["clip"][1])),
                      connector=ConnectorConfig("mlp2x_gelu"), llm=llm)
    model = VLM.from_config(cfg)
    assert len(seen) == 1
    q = seen[0]["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig) and q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype, q.bnb_4bit_use_double_quant) == want
    assert seen[0]["dtype"] == want[1]  # built in the compute dtype
    assert seen[0]["trust_remote_code"] is False if source == "path" else "trust_remote_code" not in seen[0]
    assert not any(p.requires_grad for p in model.llm.parameters())  # only adapters will train
    assert next(model.llm.parameters()).dtype == want[1]


# ---- generation that may stop -----------------------------------------------------------------------------------
PROMPT = [{"from": "human", "value": "<image>\nWhat color is the shape?"}]


def _image(w=23, h=11, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _ends_early(model, ids, px, extra: dict) -> list[int]:
    """Make the (untied) model's greedy answer end with its tokenizer's EOS after a couple of tokens: the EOS row
    of the output head becomes a slightly larger copy of the row of a token it would say there. Returns the
    answer, EOS included."""
    eos = model.tokenizer.eos_token_id
    free = model.generate(ids, None, px, max_new_tokens=6, min_new_tokens=6, **extra)[0].tolist()
    head = model.llm.get_output_embeddings().weight
    for j in range(1, 5):
        t = free[j]
        if t == eos or t in free[:j]:
            continue
        with torch.no_grad():
            saved = head[eos].clone()
            head[eos] = head[t] * 1.05
        got = model.generate(ids, None, px, max_new_tokens=12, **extra)[0].tolist()
        if got == free[:j] + [eos]:
            return got
        with torch.no_grad():
            head[eos] = saved
    raise AssertionError(f"could not make the model stop early (free answer {free})")


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_exported_model_stops_where_vlmkit_stops(kind, encoder_dirs, llm_dir_untied, tmp_path):
    """No min_new_tokens: the exported generation settings (its end token) decide where the native model stops;
    it must stop on the token the model was trained to end with, exactly where vlmkit does."""
    from transformers import AutoModelForImageTextToText

    from vlmkit.export import export_model

    cfg = model_config(encoder_dirs["clip"], llm_dir_untied)
    if kind == "llava_next":
        cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)")
    model = build_for_export(cfg)
    p = model.processor()(PROMPT, [_image()], add_generation_prompt=True)
    ids, px = p["input_ids"][None], p["pixel_values"]
    extra = {"image_sizes": p["image_sizes"]} if kind == "llava_next" else {}
    want = _ends_early(model, ids, px, extra)
    assert len(want) < 12 and want[-1] == model.tokenizer.eos_token_id
    out = export_model(model, tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert hf.generation_config.eos_token_id in (model.tokenizer.eos_token_id, [model.tokenizer.eos_token_id])
    kw = {"image_sizes": p["image_sizes"].flip(-1)} if kind == "llava_next" else {}  # (height, width)
    got = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=12,
                      do_sample=False, **kw)[0, ids.shape[1]:].tolist()
    assert got == want
