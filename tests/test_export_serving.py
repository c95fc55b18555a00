"""Train = serve: a tiny model trained until it ends its answers with EOS, exported to Llava, LlavaNext and
InternVL, answers in a process where `import vlmkit` fails exactly as vlmkit answers, and stops at the same token,
through transformers' `pipeline("image-text-to-text")`, `apply_chat_template` + `generate`, and a batched
left-padded `generate` (no min_new_tokens: a wrong eos_token_id in the export shows as a longer answer, in its
tokens: after its answer the tiny model repeats </s>, which text decoded without special tokens would hide).

The test LLM's config keeps LlamaConfig's defaults (bos 1, eos 2) while its tokenizer has <s> = 2 and </s> = 3,
as any LLM built from `config:` does: the export must write the tokenizer's ids.

InternVL's processor frames each image as `<img>` + placeholders + `</img>`, tokens vlmkit's prompts do not have:
for InternVL, vlmkit's generation runs on the ids the exported processor produces (framed), the answers are
compared there.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_for_export, model_config, save_llm
from vlmkit.config import ConnectorConfig, TilingConfig
from vlmkit.data.processor import collate
from vlmkit.evaluate import evaluate
from vlmkit.export import export_model, import_model

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = {"red": (16, 16), "green": (32, 16), "blue": (16, 32), "yellow": (24, 24)}  # AnyRes: 2 or 3 tiles
QA = [("What color is the shape?", None), ("How many shapes are there?", "two shapes"),
      ("Describe the image.", "a {} circle in the top left")]
MAX_NEW = 12


def picture(color):
    rng = np.random.default_rng(len(color))
    w, h = SIZES[color]
    px = np.clip(np.array(COLORS[color]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(px, "RGB")


def answer(q, a, color):
    return color if a is None else a.format(color)


def samples():
    """(conversation, image): every question alone, and all three in one conversation, for each colour."""
    out = []
    for color in COLORS:
        for q, a in QA:
            out.append(([{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer(q, a, color)}],
                        color))
        conv = []
        for k, (q, a) in enumerate(QA[::-1]):
            conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                     {"from": "gpt", "value": answer(q, a, color)}]
        out.append((conv, color))
    return out


def train(model, steps=120, lr=3e-3):
    """Full-batch AdamW on vlmkit's loss until the answers (and their </s>) are learnt."""
    proc = model.processor()
    batch = collate([proc(conv, [picture(c)]) for conv, c in samples()], model.tokenizer.pad_token_id)
    layout = {k: batch[k] for k in ("image_sizes", "images_per_sample", "tiles_per_image")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"], **layout)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def build(case, encoder_dirs, llm_dir, llm_dir_frames):
    return build_for_export(config(case, encoder_dirs, llm_dir, llm_dir_frames))


def config(case, encoder_dirs, llm_dir, llm_dir_frames):
    if case == "internvl":
        cfg = model_config(encoder_dirs["internvit"], llm_dir_frames, "internvit", feature_layer=-1)
        cfg.connector, cfg.tiling = ConnectorConfig("pixel_shuffle"), TilingConfig("internvl", max_tiles=2)
        cfg.encoder.image_aspect = "resize"
    else:
        cfg = model_config(encoder_dirs["clip"], llm_dir)
        if case == "llava_next":
            cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)")
    return cfg


def load_processor(out):
    """The exported processor in this process (InternVL's without its video processor: no torchvision here)."""
    from unittest import mock

    from transformers import AutoProcessor
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    with mock.patch.object(AutoVideoProcessor, "from_pretrained", return_value=None), \
            mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                              lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        return AutoProcessor.from_pretrained(out, backend="pil")


# Runs with `python -I` (no PYTHONPATH, no working directory on sys.path) and a meta-path hook that refuses
# vlmkit (installed editable in the environment): only transformers serves the export.
SERVE = textwrap.dedent("""
    import sys

    class NoVlmkit:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "vlmkit":
                raise ImportError("vlmkit is not available to this process")

    sys.meta_path.insert(0, NoVlmkit())
    try:
        import vlmkit  # noqa: F401
        raise SystemExit("vlmkit was importable")
    except ImportError:
        pass

    import json
    from unittest import mock

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    job = json.load(open(sys.argv[1]))
    out, max_new = job["out"], job["max_new_tokens"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    check = ProcessorMixin.check_argument_for_proper_class
    # InternVLProcessor builds a video processor, which needs torchvision (absent here): skip that one part
    with mock.patch.object(AutoVideoProcessor, "from_pretrained", return_value=None), \\
            mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                              lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        proc = AutoProcessor.from_pretrained(out, backend="pil")
    images = [Image.open(f).convert("RGB") for f in job["images"]]
    chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
             for im, q in zip(images, job["questions"])]
    res = {"vlmkit_loaded": any(m.split(".")[0] == "vlmkit" for m in sys.modules),
           "eos_token_id": model.generation_config.eos_token_id}

    pipe = pipeline("image-text-to-text", model=model, processor=proc)
    res["pipeline"] = [pipe(text=chat, max_new_tokens=max_new, return_full_text=False)[0]["generated_text"].strip()
                       for chat in chats]

    res["single"], res["pipeline_tokens"] = [], []
    for chat in chats:
        enc = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        n = enc["input_ids"].shape[1]
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=max_new, do_sample=False)[0, n:]
        res["single"].append(new.tolist())
        ids = pipe(text=chat, max_new_tokens=max_new, return_tensors=True)[0]["generated_token_ids"]
        res["pipeline_tokens"].append(ids[n:].tolist())

    proc.tokenizer.padding_side = "left"
    texts = [proc.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    enc = proc(text=texts, images=images, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        rows = model.generate(**enc, max_new_tokens=max_new, do_sample=False)[:, enc["input_ids"].shape[1]:]
    res["batch"] = rows.tolist()
    res["batch_ids"] = enc["input_ids"].tolist()
    res["batch_mask"] = enc["attention_mask"].tolist()
    print(json.dumps(res))
""")

CASES = ["llava", "llava_next", "internvl"]


@pytest.fixture(scope="module")
def llm_dir_frames(tmp_path_factory, tok_dir):
    """The test LLM with InternVL's frame tokens in its tokenizer (as InternVL's LLMs have them), so that vlmkit
    can run the exported processor's framed prompts."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llm_frames")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens(["<img>", "</img>", "<video>"], special_tokens=True)
    tok.save_pretrained(str(d / "tok"))
    return save_llm(d / "llm", str(d / "tok"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, encoder_dirs, llm_dir, llm_dir_frames):
    """case -> (trained model, export dir, eval file, what the vlmkit-free process answered)."""
    d = tmp_path_factory.mktemp("serving")
    files, questions, recs = [], [], []
    for color in COLORS:
        picture(color).save(d / f"{color}.png")
        for q, a in QA:
            files.append(str(d / f"{color}.png"))
            questions.append(q)
            recs.append({"id": f"{color}-{len(recs)}", "image": f"{color}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer(q, a, color)}]})
    (d / "eval.json").write_text(json.dumps(recs))
    out = {}
    for case in CASES:
        model = build(case, encoder_dirs, llm_dir, llm_dir_frames)
        train(model)
        exp = export_model(model, d / f"hf_{case}")
        job = d / f"{case}.json"
        job.write_text(json.dumps({"out": str(exp), "images": files, "questions": questions,
                                   "max_new_tokens": MAX_NEW}))
        res = subprocess.run([sys.executable, "-I", "-c", SERVE, str(job)], capture_output=True, text=True,
                             cwd=d, timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                                      "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                                      "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr[-3000:]
        out[case] = (model, exp, d / "eval.json", json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def vlmkit_prompts(model, case, exp, eval_file):
    """Each eval question's prompt as vlmkit's eval builds it; for InternVL the exported processor's (framed) ids."""
    recs = json.loads(eval_file.read_text())
    ims = [picture(r["id"].split("-")[0]) for r in recs]
    if case != "internvl":
        proc = model.processor()
        return [proc(r["conversations"][:-1], [im], add_generation_prompt=True) for r, im in zip(recs, ims)]
    hf = load_processor(exp)
    out = []
    for r, im in zip(recs, ims):
        text = hf.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]}],
                                      add_generation_prompt=True)
        enc = hf(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
        n = enc["pixel_values"].shape[0]
        out.append({"input_ids": enc["input_ids"][0], "labels": enc["input_ids"][0], "pixel_values":
                    enc["pixel_values"], "image_sizes": torch.tensor([im.size]),
                    "tiles_per_image": torch.tensor([n])})
    return out


@pytest.mark.parametrize("case", CASES)
def test_served_answers_and_stops_equal_vlmkit(case, served):
    model, exp, eval_file, got = served[case]
    tok = model.tokenizer
    assert got["vlmkit_loaded"] is False
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 3) and model.llm.config.eos_token_id == 2  # they differ
    prompts = vlmkit_prompts(model, case, exp, eval_file)

    # vlmkit, one prompt at a time: every answer ends with </s> well before max_new_tokens (its EOS is real)
    single = []
    for p in prompts:
        layout = {"image_sizes": p["image_sizes"], "tiles_per_image": p["tiles_per_image"]}
        new = model.generate(p["input_ids"][None], None, p["pixel_values"], max_new_tokens=MAX_NEW, **layout)[0]
        single.append(new.tolist())
    assert all(s[-1] == tok.eos_token_id and s.count(tok.eos_token_id) == 1 and len(s) < MAX_NEW for s in single)
    assert len({len(s) for s in single}) >= 3  # answers of different lengths: the stop position matters
    # the tiny model repeats </s> after its answer: a wrong EOS shows in the tokens, not in the text decoded
    # without special tokens, so every route compares tokens too
    assert got["single"] == single and got["pipeline_tokens"] == single

    # the vlmkit eval path (batched, left-padded) answers what transformers' pipeline answers (InternVL: on
    # prompts without the frame, which the trained model answers as with it)
    res = evaluate(model, str(eval_file), progress=False, max_new_tokens=MAX_NEW)
    answers = [r["answer"] for r in res["samples"]]
    assert res["accuracy"] >= 0.75, answers  # it learnt its answers
    assert answers == [tok.decode(s, skip_special_tokens=True).strip() for s in single]
    assert got["pipeline"] == answers

    # batched and left-padded: the same ids in transformers and vlmkit give the same rows, padding after </s>
    b = collate(prompts, tok.pad_token_id, padding_side="left")
    layout = {k: b[k] for k in ("image_sizes", "images_per_sample", "tiles_per_image")}
    if case != "internvl":
        assert got["batch_ids"] == b["input_ids"].tolist() and got["batch_mask"] == b["attention_mask"].tolist()
    ids, mask = torch.tensor(got["batch_ids"]), torch.tensor(got["batch_mask"])
    rows = model.generate(ids, mask, b["pixel_values"], max_new_tokens=MAX_NEW, **layout).tolist()
    assert got["batch"] == rows
    assert [r[:len(s)] for r, s in zip(rows, single)] == single
    assert got["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("case", CASES)
def test_export_writes_and_import_reads_the_tokenizers_ids(case, served):
    """generation_config.json and the text config hold the tokenizer's ids; the model card says so and what they
    replaced; `vlmkit import` reads them back into the LLM's config (which a vlmkit folder saves)."""
    model, exp, _, _ = served[case]
    tok = model.tokenizer
    want = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    gen = json.loads((exp / "generation_config.json").read_text())
    text = json.loads((exp / "config.json").read_text())["text_config"]
    assert {k: gen[k] for k in want} == want and {k: text[k] for k in want} == want
    card = (exp / "README.md").read_text()
    assert "eos_token_id 3 (`</s>`)" in card and "eos_token_id 2 -> 3 (</s>) in the LLM config" in card
    back = import_model(exp)
    assert {k: getattr(back.llm.config, k) for k in want} == want
    assert {k: getattr(back.llm.generation_config, k) for k in want} == want


def test_export_logs_what_it_changed(served, tmp_path, caplog):
    model, *_ = served["llava"]
    with caplog.at_level("WARNING", logger="vlmkit.export"):
        export_model(model, tmp_path / "again")
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "eos_token_id 2 -> 3 (</s>) in the LLM config" in msg and "bos_token_id 1 -> 2 (<s>)" in msg


def test_import_reads_generation_config(served, tmp_path, caplog):
    """`vlmkit import` takes generation_config.json's ids over the text config's, keeps them in the vlmkit folder it
    writes, and warns when the checkpoint's EOS is not the tokenizer's (vlmkit's generate stops at the tokenizer's)."""
    import shutil

    from vlmkit import VLM
    from vlmkit.cli import main

    _, exp, _, _ = served["llava"]
    hf = tmp_path / "hf"
    shutil.copytree(exp, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["text_config"].update(eos_token_id=2, bos_token_id=1)  # as an LLM config's defaults
    (hf / "config.json").write_text(json.dumps(cfg))
    assert main(["import", str(hf), str(tmp_path / "back")]) == 0
    back = VLM.from_pretrained(tmp_path / "back")
    assert (back.llm.config.bos_token_id, back.llm.config.eos_token_id) == (2, 3)
    gen = json.loads((hf / "generation_config.json").read_text())
    (hf / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=2)))
    with caplog.at_level("WARNING", logger="vlmkit.export"):
        import_model(hf)
    assert "vlmkit's generate stops at the tokenizer's" in caplog.text


CONVERSATION = [{"from": "human", "value": "<image>\nWhat's this — «ça»? 日本!!"},
                {"from": "gpt", "value": "Ça coûte 5€ 🙂"},
                {"from": "human", "value": "How many shapes are there?!"},
                {"from": "gpt", "value": 'two, "red"; shapes'}]


@pytest.mark.parametrize("template", ["vicuna_v1", "tokenizer"])
@pytest.mark.parametrize("tok", ["llama", "qwen"])
@pytest.mark.parametrize("case", ["llava_next", "internvl"])
def test_multi_turn_ids_through_the_exported_processor(case, tok, template, encoder_dirs, llm_dir, llm_dir_frames,
                                                       tmp_path):
    """LlavaNext's and InternVL's processors give vlmkit's training ids for whole multi-turn conversations and its
    prompts (InternVL's `<img>` / `</img>` frame aside), with a Llama-style and a Qwen2-style tokenizer."""
    from conftest import make_llama_tokenizer, make_qwen2_tokenizer
    from vlmkit.data.conversation import normalize

    cfg = config(case, encoder_dirs, llm_dir, llm_dir_frames)
    cfg.llm.tokenizer = (make_llama_tokenizer if tok == "llama" else make_qwen2_tokenizer)(tmp_path / tok)
    cfg.template = template
    model = build_for_export(cfg)
    out = export_model(model, tmp_path / "out")
    assert import_model(out).config.template == template  # the exported template is recognised as vlmkit's
    hf = load_processor(out)
    frames = [hf.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>")] if case == "internvl" else []
    im = picture("green")
    for conv, gen in ((CONVERSATION, False), (CONVERSATION[:3], True)):
        want = model.processor()(conv, [im], add_generation_prompt=gen)["input_ids"].tolist()
        text = hf.apply_chat_template(normalize(conv), add_generation_prompt=gen)
        got = hf(text=text, images=[im], add_special_tokens=False)["input_ids"][0]
        assert [t for t in got if t not in frames] == want, (text, tok)
