"""Export to transformers-native Llava: same logits, same generation, same preprocessing and prompt ids,
export -> import -> export is exact, unsupported parts refused, and loading needs no vlmkit."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import build_for_export, make_bpe_tokenizer, make_llama_tokenizer, make_qwen2_tokenizer, model_config
from vlmkit import VLM
from vlmkit.data.conversation import encode, get_template, normalize
from vlmkit.export import export_llava, import_llava

PROMPT = [{"from": "human", "value": "<image>\nWhat color is the shape?"}]
CONVERSATION = PROMPT + [{"from": "gpt", "value": "a red circle"},
                         {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]
# case -> (conftest encoder case, input size, tied LLM): clip_24 runs a 16px CLIP at 24px (position table
# interpolated once at export), clip_untied has a separate lm_head
CASES = {"clip": ("clip", None, True), "siglip": ("siglip", None, True), "clip_24": ("clip", 24, True),
         "clip_untied": ("clip", None, False)}


def build(case, encoder_dirs, llm_dir, template="vicuna_v1", seed=0, llm_dir_untied=None):
    enc_case, size, tied = CASES[case]
    cfg = model_config(encoder_dirs[enc_case], llm_dir if tied else llm_dir_untied, enc_case, template=template)
    cfg.encoder.image_size = size
    return build_for_export(cfg, seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, encoder_dirs, llm_dir, llm_dir_untied):
    """case -> (vlmkit model, export dir)."""
    out = {}
    for case in CASES:
        model = build(case, encoder_dirs, llm_dir, llm_dir_untied=llm_dir_untied)
        out[case] = (model, export_llava(model, tmp_path_factory.mktemp(f"llava_{case}")))
    return out


def image(w=23, h=11, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def vlmkit_inputs(model, conversation=PROMPT, images=None):
    p = model.processor()(conversation, images or [image()], add_generation_prompt=True)
    return p["input_ids"][None], p["pixel_values"]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_generation_match(case, exported):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    model, out = exported[case]
    llava = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(llava, LlavaForConditionalGeneration)
    assert llava.config.vision_feature_select_strategy == ("full" if case == "siglip" else "default")
    # a batch of two different prompts (right-padded), two images
    a, px_a = vlmkit_inputs(model, PROMPT, [image(23, 11)])
    b, px_b = vlmkit_inputs(model, CONVERSATION[:3], [image(9, 30, seed=1)])
    T = max(a.shape[1], b.shape[1])
    ids = torch.full((2, T), model.tokenizer.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for r, x in enumerate((a, b)):
        ids[r, : x.shape[1]], mask[r, : x.shape[1]] = x[0], 1
    px = torch.cat([px_a, px_b])
    with torch.no_grad():
        ref = model.logits(ids, mask, px)
        got = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    keep = mask.bool()
    assert got.shape == ref.shape
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=0)

    new_ref = model.generate(a, None, px_a, max_new_tokens=8, min_new_tokens=8)
    new_got = llava.generate(input_ids=a, attention_mask=torch.ones_like(a), pixel_values=px_a, max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)[:, a.shape[1]:]
    assert new_got.tolist() == new_ref.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_processor_matches_vlmkit(case, exported):
    from transformers import AutoProcessor

    model, out = exported[case]
    proc = None
    for kw in ({"backend": "pil"}, {"use_fast": False}, {}):  # PIL backend where torchvision is installed too
        try:
            proc = AutoProcessor.from_pretrained(out, **kw)
            break
        except (TypeError, ValueError):
            continue
    # PIL's bicubic is vlmkit's: equal. torchvision's bicubic (when only it could be had) differs by
    # a few 1e-2 at edges of small images: close, not equal.
    pil = "Fast" not in type(proc.image_processor).__name__ and "torchvision" not in type(proc.image_processor).__module__
    atol = 1e-5 if pil else 0.05
    ref = model.processor()
    for im in (image(23, 11), image(9, 30, seed=1), image(16, 16, seed=2).convert("RGB")):
        got = proc.image_processor(images=im, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got[0], ref.transform(im), atol=atol, rtol=0)

    im = image()
    want, _ = encode(normalize(PROMPT), model.tokenizer, get_template("vicuna_v1"), "<image>", model.image_token_id,
                     [model.encoder.num_tokens], add_generation_prompt=True)
    # the rendered prompt through the processor (the `processor(text=..., images=...)` route)
    text = proc.apply_chat_template(normalize(PROMPT), add_generation_prompt=True)
    enc = proc(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == want
    torch.testing.assert_close(enc["pixel_values"][0], ref.transform(im), atol=1e-5, rtol=0)
    # structured content, tokenized by apply_chat_template itself
    msgs = [{"role": "user", "content": [{"type": "image", "image": im},
                                         {"type": "text", "text": "What color is the shape?"}]}]
    enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    assert enc["input_ids"][0].tolist() == want


UNICODE = [{"from": "human", "value": "<image>\nWhat's this — «ça»? 日本!!"}, {"from": "gpt", "value": "Ça coûte 5€ 🙂"},
           {"from": "human", "value": "How many shapes are there?!"}, {"from": "gpt", "value": 'two, "red"; shapes'}]
TOKENIZER_MAKERS = {"bpe": make_bpe_tokenizer, "llama": make_llama_tokenizer, "qwen": make_qwen2_tokenizer}


@pytest.mark.parametrize("tok", ["wordlevel", "bpe", "llama", "qwen"])
@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "tokenizer"])
def test_chat_template_matches_encode(template, tok, tmp_path, encoder_dirs, llm_dir):
    """Whole conversations and prompts render to vlmkit's ids, for each kind of template and tokenizer (word-level,
    byte-level BPE, Llama-style sentencepiece with legacy=False, Qwen2-style with ChatML): through the processor
    with the rendered text, and through apply_chat_template's own tokenization (the pipeline's route)."""
    from transformers import AutoProcessor

    cfg = model_config(encoder_dirs["clip"], llm_dir, template=template)
    if tok != "wordlevel":  # the LLM's embeddings are resized to the tokenizer
        cfg.llm.tokenizer = TOKENIZER_MAKERS[tok](tmp_path / tok)
    model = VLM.from_config(cfg)
    proc = AutoProcessor.from_pretrained(export_llava(model, tmp_path / "out"))
    n = model.encoder.num_tokens
    for conv, gen in ((CONVERSATION, False), (PROMPT, True), (CONVERSATION[:3], True), (UNICODE, False),
                      (UNICODE[:3], True)):
        msgs = normalize(conv)
        want, _ = encode(msgs, model.tokenizer, get_template(template), "<image>", model.image_token_id, [n], gen)
        text = proc.apply_chat_template(msgs, add_generation_prompt=gen)
        got = proc(text=text, images=[image()], add_special_tokens=False)["input_ids"][0]
        assert list(got) == want, (template, gen, text)
        if template != "tokenizer":  # the test chat_templates read string contents only
            parts = [{"role": m["role"], "content": ([{"type": "image", "image": image()}] if "<image>" in m["content"]
                                                     else []) + [{"type": "text", "text": m["content"].replace(
                                                         "<image>\n", "")}]} for m in msgs]
            got = proc.apply_chat_template(parts, add_generation_prompt=gen, tokenize=True, return_dict=True)
            assert list(got["input_ids"][0]) == want, (template, gen, text)


@pytest.mark.parametrize("case", list(CASES))
def test_export_import_export_is_exact(case, exported, tmp_path):
    model, out = exported[case]
    back = import_llava(out)
    assert back.config.template == "vicuna_v1"
    assert back.config.encoder.image_aspect == "pad"
    assert back.encoder.kind == model.encoder.kind and back.image_token_id == model.image_token_id
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(export_llava(back, tmp_path / "again") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the imported model computes what the original did, and trains (the vlmkit loss path)
    ids, px = vlmkit_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(ids, None, px), model.logits(ids, None, px), atol=1e-4, rtol=0)
    p = back.processor()(CONVERSATION, [image()])
    loss = back(p["input_ids"][None], None, p["pixel_values"], p["labels"][None])
    loss.backward()
    assert torch.isfinite(loss) and back.connector.linear_1.weight.grad is not None


@pytest.mark.parametrize("case", ["dinov2", "dinov2_registers", "internvit", "siglip2_naflex"])
def test_unsupported_encoders_refused(case, encoder_dirs, llm_dir, tmp_path):
    torch.manual_seed(0)
    model = VLM.from_config(model_config(encoder_dirs[case], llm_dir, case))
    why = {"dinov2": "vLLM", "dinov2_registers": "registers", "internvit": "InternVL", "siglip2_naflex": "NaFlex"}
    with pytest.raises(ValueError, match=why[case]):
        export_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_connector_depth_refused(encoder_dirs, llm_dir, tmp_path):
    cfg = model_config(encoder_dirs["clip"], llm_dir)
    cfg.connector.options = {"depth": 3}
    with pytest.raises(ValueError, match="depth 3"):
        export_llava(VLM.from_config(cfg), tmp_path / "out")


# the shape of llava-hf/llava-1.5's template: list contents, images first
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_import_foreign_llava(tmp_path, tok_dir):
    """A Llava checkpoint not written by vlmkit (llava-hf style: CLIP processor with shortest-edge resize and
    centre crop, chat template of its own) imports and computes what transformers computes."""
    from transformers import (AutoConfig, CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from conftest import ENCODER_CASES, LLM_KW
    from vlmkit.llm import load_tokenizer

    tok = load_tokenizer(tok_dir, "<image>")
    vkw, tkw = dict(ENCODER_CASES["clip"][1]), dict(LLM_KW, vocab_size=len(tok))
    cfg = LlavaConfig(vision_config=AutoConfig.for_model(vkw.pop("model_type"), **vkw),
                      text_config=AutoConfig.for_model(tkw.pop("model_type"), **tkw),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    torch.manual_seed(3)
    llava = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1,
                   chat_template=LLAVA_HF_TEMPLATE).save_pretrained(tmp_path / "hf")
    llava.save_pretrained(tmp_path / "hf")
    model = import_llava(tmp_path / "hf")
    # llava-hf's template reads list contents only: vlmkit cannot use it, so the default, with a warning
    assert model.config.template == "vicuna_v1"
    assert model.config.encoder.image_aspect == "pad"  # LLaVA-1.5's training mode (no centre crop in vlmkit)
    ids, px = vlmkit_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids, None, px), llava(input_ids=ids, pixel_values=px).logits,
                                   atol=1e-4, rtol=0)
    assert import_llava(tmp_path / "hf", template="plain", image_aspect="resize").config.template == "plain"


def test_lora_model_exports_merged(tmp_path, encoder_dirs, llm_dir):
    """A saved model with LoRA adapters exports with the adapters folded in; a live one must be merged first."""
    from vlmkit.config import ComponentPlan

    model = build("clip", encoder_dirs, llm_dir)
    ids, px = vlmkit_inputs(model)
    with torch.no_grad():
        base = model.logits(ids, None, px)
    model.add_lora("llm", ComponentPlan(mode="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapters change the output
    model.eval().save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="merge_lora"):
        export_llava(model, tmp_path / "out")
    from transformers import AutoModelForImageTextToText

    llava = AutoModelForImageTextToText.from_pretrained(export_llava(tmp_path / "lora", tmp_path / "out")).eval()
    with torch.no_grad():
        ref = model.logits(ids, None, px)
        assert (ref - base).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(llava(input_ids=ids, pixel_values=px).logits, ref, atol=1e-4, rtol=0)
        model.merge_lora()
        torch.testing.assert_close(model.logits(ids, None, px), ref, atol=1e-4, rtol=0)


def test_loads_without_vlmkit(exported, tmp_path):
    """A plain python process (vlmkit never imported) loads model + processor and gives the same logits."""
    model, out = exported["clip"]
    ids, px = vlmkit_inputs(model)
    with torch.no_grad():
        ref = model.logits(ids, None, px)
    torch.save({"ids": ids, "px": px}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import sys, json, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
        proc = AutoProcessor.from_pretrained({str(out)!r})
        x = torch.load({str(tmp_path / 'in.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=x["ids"], pixel_values=x["px"]).logits
        torch.save(logits, {str(tmp_path / 'out.pt')!r})
        text = proc.apply_chat_template([{{"role": "user", "content": "<image>\\nhello"}}], add_generation_prompt=True)
        print(json.dumps({{"vlmkit_loaded": any(m.split(".")[0] == "vlmkit" for m in sys.modules),
                          "class": type(model).__name__, "processor": type(proc).__name__, "text": text}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"vlmkit_loaded": False, "class": "LlavaForConditionalGeneration", "processor": "LlavaProcessor",
                    "text": info["text"]}
    assert info["text"].startswith("<s>A chat between") and info["text"].endswith("USER: <image>\nhello ASSISTANT:")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, atol=1e-4, rtol=0)


def test_model_card_lists_run_metrics(tmp_path, encoder_dirs, llm_dir):
    model = build("clip", encoder_dirs, llm_dir)
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    model.save_pretrained(run / "pretrain")
    (run / "pretrain" / "metrics.json").write_text(json.dumps({"stage": "pretrain", "final_loss": 1.25, "skipped": []}))
    (run / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    from vlmkit.cli import main

    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    for s in ("clip_vision_model", "mlp2x_gelu", "llama", "vicuna_v1", "pretrain/metrics.json", "final_loss",
              "eval_accuracy"):
        assert s in card, s
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0  # a previous export is replaced
    with pytest.raises(FileExistsError):  # anything else is not
        export_llava(model, run / "pretrain")
    assert (run / "pretrain" / "metrics.json").exists()
