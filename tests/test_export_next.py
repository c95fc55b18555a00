"""Export to transformers-native LlavaNext (AnyRes): same logits on odd-sized images (unpad at work), same
generation, same preprocessing, prompt ids and token counts, export -> import -> export exact, the options
LlavaNext lacks refused, and loading needs no vlmkit."""
import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import build_for_export, model_config
from vlmkit import VLM
from vlmkit.config import ConnectorConfig, TilingConfig
from vlmkit.data.conversation import normalize
from vlmkit.export import export_llava_next, export_model, import_model
from vlmkit.tiling import anyres_feature_grid

PROMPT = [{"from": "human", "value": "<image>\nWhat color is the shape?"}]
CONVERSATION = PROMPT + [{"from": "gpt", "value": "a red circle"},
                         {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]
# case -> (conftest encoder case, input size, tied LLM). The canvases are 1x1 .. 3x3 tiles of the input size;
# clip_24 runs the 16px CLIP at 24px (position table interpolated once at export)
CASES = {"clip": ("clip", None, True), "siglip": ("siglip", None, True), "clip_24": ("clip", 24, True),
         "clip_untied": ("clip", None, False)}
SIZES = [(41, 23), (9, 30)]  # (width, height): aspect ratios no canvas has, so unpad crops features


def build(case, encoder_dirs, llm_dir, llm_dir_untied=None, seed=0, **tiling):
    enc_case, size, tied = CASES[case]
    cfg = model_config(encoder_dirs[enc_case], llm_dir if tied else llm_dir_untied, enc_case)
    cfg.encoder.image_size = size
    cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(3x3)", **tiling)
    return build_for_export(cfg, seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, encoder_dirs, llm_dir, llm_dir_untied):
    """case -> (vlmkit model, export dir)."""
    out = {}
    for case in CASES:
        model = build(case, encoder_dirs, llm_dir, llm_dir_untied)
        out[case] = (model, export_model(model, tmp_path_factory.mktemp(f"next_{case}")))
    return out


def image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def vlmkit_inputs(model, conversation=PROMPT, im=None):
    p = model.processor()(conversation, [im or image(*SIZES[0])], add_generation_prompt=True)
    return p["input_ids"][None], p["pixel_values"], p["image_sizes"]


def load_processor(out):
    from transformers import AutoProcessor

    # the PIL backend (vlmkit's resize) where torchvision is installed too: with it the default image
    # processor resizes with torchvision's bicubic, which differs by a few 1e-2 at tile edges
    for kw in ({"backend": "pil"}, {"use_fast": False}, {}):
        try:
            return AutoProcessor.from_pretrained(out, **kw)
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"no processor loads from {out}")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_generation_match(case, exported):
    from transformers import AutoModelForImageTextToText, LlavaNextForConditionalGeneration

    model, out = exported[case]
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(hf, LlavaNextForConditionalGeneration)
    assert hf.config.vision_feature_select_strategy == ("full" if case == "siglip" else "default")
    tile = model.encoder.image_size
    for w, h in SIZES:  # the padding really is cropped from the feature grid
        g = anyres_feature_grid((w, h), model.tiling.pinpoints, tile, model.encoder.grid[0])
        assert (g["unpad_h"], g["unpad_w"]) != (g["padded_h"], g["padded_w"]), (w, h, g)
    # a batch of two different prompts (right-padded), two images of different tile counts
    a, px_a, sz_a = vlmkit_inputs(model, PROMPT, image(*SIZES[0]))
    b, px_b, sz_b = vlmkit_inputs(model, CONVERSATION[:3], image(*SIZES[1], seed=1))
    T = max(a.shape[1], b.shape[1])
    ids = torch.full((2, T), model.tokenizer.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for r, x in enumerate((a, b)):
        ids[r, : x.shape[1]], mask[r, : x.shape[1]] = x[0], 1
    px, sizes = torch.cat([px_a, px_b]), torch.cat([sz_a, sz_b])  # [N_tiles, 3, T, T], (width, height)
    with torch.no_grad():
        ref = model.logits(ids, mask, px, image_sizes=sizes, images_per_sample=[1, 1])
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes.flip(-1)).logits  # (h, w)
    keep = mask.bool()
    assert got.shape == ref.shape
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=0)

    new_ref = model.generate(a, None, px_a, max_new_tokens=8, min_new_tokens=8, image_sizes=sz_a)
    new_got = hf.generate(input_ids=a, attention_mask=torch.ones_like(a), pixel_values=px_a,
                          image_sizes=sz_a.flip(-1), max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, a.shape[1]:]
    assert new_got.tolist() == new_ref.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_processor_matches_vlmkit(case, exported):
    model, out = exported[case]
    proc = load_processor(out)
    assert type(proc).__name__ == "LlavaNextProcessor"
    ref = model.processor()
    for k, (w, h) in enumerate(SIZES + [(16, 16), (100, 7)]):
        im = image(w, h, seed=k)
        want = ref(PROMPT, [im], add_generation_prompt=True)
        # the rendered prompt through the processor (the `processor(text=..., images=...)` route)
        text = proc.apply_chat_template(normalize(PROMPT), add_generation_prompt=True)
        enc = proc(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
        assert enc["input_ids"][0].tolist() == want["input_ids"].tolist(), (w, h)
        assert enc["image_sizes"].tolist() == [[h, w]]
        n = want["pixel_values"].shape[0]  # the processor pads the tile dimension of a batch with zeros
        torch.testing.assert_close(enc["pixel_values"][0, :n], want["pixel_values"], atol=1e-5, rtol=0)
        # structured content, tokenized by apply_chat_template itself
        msgs = [{"role": "user", "content": [{"type": "image", "image": im},
                                             {"type": "text", "text": "What color is the shape?"}]}]
        enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        assert enc["input_ids"][0].tolist() == want["input_ids"].tolist()
    # token counts agree over many sizes (transformers counts from (height, width))
    rng = random.Random(0)
    sizes = [(rng.randint(1, 200), rng.randint(1, 200)) for _ in range(300)]
    counts = proc._get_num_multimodal_tokens(image_sizes=[[h, w] for w, h in sizes])["num_image_tokens"]
    assert counts == [model.count_image_tokens(w, h) for w, h in sizes]


@pytest.mark.parametrize("case", list(CASES))
def test_export_import_export_is_exact(case, exported, tmp_path):
    model, out = exported[case]
    back = import_model(out)
    assert back.config.template == "vicuna_v1" and back.config.tiling.mode == "anyres"
    assert back.tiling.pinpoints == model.tiling.pinpoints and back.tiling.unpad
    assert back.encoder.kind == model.encoder.kind and back.image_token_id == model.image_token_id
    assert torch.equal(back.image_newline, model.image_newline)
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(export_model(back, tmp_path / "again") / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("image_newline") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the imported model computes what the original did, and trains (the vlmkit loss path)
    ids, px, sizes = vlmkit_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(ids, None, px, image_sizes=sizes),
                                   model.logits(ids, None, px, image_sizes=sizes), atol=1e-4, rtol=0)
    p = back.processor()(CONVERSATION, [image(*SIZES[1])])
    loss = back(p["input_ids"][None], None, p["pixel_values"], p["labels"][None], image_sizes=p["image_sizes"])
    loss.backward()
    assert torch.isfinite(loss) and back.image_newline.grad is not None


def test_loads_without_vlmkit(exported, tmp_path):
    """A plain python process (vlmkit never imported) loads model + processor and gives the same logits."""
    model, out = exported["clip"]
    ids, px, sizes = vlmkit_inputs(model)
    with torch.no_grad():
        ref = model.logits(ids, None, px, image_sizes=sizes)
    torch.save({"ids": ids, "px": px, "sizes": sizes.flip(-1)}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import sys, json, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
        proc = AutoProcessor.from_pretrained({str(out)!r})
        x = torch.load({str(tmp_path / 'in.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=x["ids"], pixel_values=x["px"], image_sizes=x["sizes"]).logits
        torch.save(logits, {str(tmp_path / 'out.pt')!r})
        print(json.dumps({{"vlmkit_loaded": any(m.split(".")[0] == "vlmkit" for m in sys.modules),
                          "class": type(model).__name__, "processor": type(proc).__name__}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"vlmkit_loaded": False, "class": "LlavaNextForConditionalGeneration",
                    "processor": "LlavaNextProcessor"}
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiling, match", [
    ({"unpad": False}, "unpad: false"),
    ({"anyres_max": 4}, "OneVision"),
])
def test_anyres_options_llava_next_lacks_refused(tiling, match, encoder_dirs, llm_dir, tmp_path):
    model = build("clip", encoder_dirs, llm_dir, **tiling)
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("enc_case, connector, match", [
    ("dinov2", ConnectorConfig("mlp2x_gelu"), "dinov2.*vLLM"),
    ("clip", ConnectorConfig("avgpool_mlp", {"kernel": 2}), "avgpool_mlp.*average pooling"),
])
def test_parts_llava_next_cannot_hold_refused(enc_case, connector, match, encoder_dirs, llm_dir, tmp_path):
    cfg = model_config(encoder_dirs[enc_case], llm_dir, enc_case)
    cfg.connector = connector
    cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)")
    with pytest.raises(ValueError, match=f"to LlavaNext: .*{match}|{match}"):
        export_model(VLM.from_config(cfg), tmp_path / "out")
    with pytest.raises(ValueError, match="LlavaNext"):
        export_llava_next(VLM.from_config(cfg), tmp_path / "out")


def test_cli_export_picks_llava_next_and_import_reads_it(exported, tmp_path):
    """`vlmkit export` picks LlavaNext from the parts (a saved folder); `vlmkit import` makes a vlmkit folder."""
    from vlmkit.cli import main

    model, _ = exported["clip"]
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava_next"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "LlavaNextForConditionalGeneration" in card and "image_newline" in card and "AnyRes" in card
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = VLM.from_pretrained(tmp_path / "back")
    ids, px, sizes = vlmkit_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(ids, None, px, image_sizes=sizes),
                                   model.logits(ids, None, px, image_sizes=sizes), atol=1e-4, rtol=0)
