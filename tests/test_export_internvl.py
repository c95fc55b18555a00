"""Export to transformers-native InternVL: on the token sequence the exported processor produces (vlmkit's
placeholders framed by <img> ... </img>), logits and greedy tokens equal vlmkit's; same tiles and pixels;
export -> import -> export exact; frame tokens added when missing; parts InternVL cannot hold refused; the
model loads without vlmkit.

This machine has no torchvision, and transformers' InternVLProcessor always builds a video processor, which
needs it. `load_processor` therefore loads the export with AutoProcessor while transformers' video processor
loader returns None and the class check of that one argument is skipped; everything else (tokenizer, image
processor, image_seq_length, chat template) is read from the files by transformers itself.
`test_autoprocessor_with_torchvision` loads it unpatched where torchvision is installed.
"""
import importlib.util
import json
import random
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import build_hf_encoder, make_wordlevel_tokenizer, model_config, save_llm
from vlmkit import VLM
from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig
from vlmkit.export import export_model, import_model
from vlmkit.export_internvl import export_internvl

CTX = "<IMG_CONTEXT>"
QUESTION = "What color is the shape?"
PROMPT = [{"from": "human", "value": f"{CTX}\n{QUESTION}"}]
# case -> (encoder variant, feature_layer, input size, tiling): internvit at 16px (4x4 patches -> 2x2 tokens per
# tile), tiled 1..6; `norm` ends the tower with a LayerNorm (use_mean_pooling false), so vlmkit's
# hidden_states[-1] is InternVL's vision_feature_layer N; iv_24 runs it at 24px (position table interpolated at
# each forward by both); single has no tiling (image stretched to the tile)
CASES = {"tiled": ("plain", -1, None, TilingConfig("internvl", max_tiles=6)),
         "norm": ("norm", -1, None, TilingConfig("internvl", max_tiles=4)),
         "layer2": ("plain", -2, 24, TilingConfig("internvl", min_tiles=1, max_tiles=3)),
         "single": ("plain", -1, None, TilingConfig())}
SIZES = [(41, 23), (9, 30)]  # (width, height)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tokenizer that has InternVL's tokens (<img>, </img>, <video>, <IMG_CONTEXT>), its LLM, two towers."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("internvl_parts")
    tok = AutoTokenizer.from_pretrained(make_wordlevel_tokenizer(d / "tok0"))
    tok.add_tokens(["<img>", "</img>", "<video>", CTX], special_tokens=True)
    tok.save_pretrained(str(d / "tok"))
    encs = {}
    for name, kw in (("plain", {}), ("norm", {"use_mean_pooling": False})):
        enc = build_hf_encoder("internvit")
        if kw:
            from transformers import AutoConfig, AutoModel

            c = enc.config.to_dict() | kw
            torch.manual_seed(0)
            enc = AutoModel.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
            with torch.no_grad():  # the final LayerNorm must matter
                enc.layernorm.weight.normal_(1, 0.5)
                enc.layernorm.bias.normal_(0, 0.5)
        enc.save_pretrained(str(d / name))
        encs[name] = str(d / name)
    return {"llm": save_llm(d / "llm", str(d / "tok")), "enc": encs}


def build(case, parts, seed=0, **over):
    variant, layer, size, tiling = CASES[case]
    cfg = ModelConfig(encoder=EncoderConfig(name="internvit", path=parts["enc"][variant], feature_layer=layer,
                                            image_size=size, image_aspect="resize"),
                      connector=ConnectorConfig("pixel_shuffle"), llm=LLMConfig(path=parts["llm"], image_token=CTX),
                      tiling=tiling)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = VLM.from_config(cfg).eval()
    with torch.no_grad():  # the connector is random anyway; make LayerNorm and biases non-trivial too
        for p in model.connector.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, parts):
    out = {}
    for case in CASES:
        model = build(case, parts)
        out[case] = (model, export_model(model, tmp_path_factory.mktemp(f"internvl_{case}")))
    return out


def image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def load_processor(out):
    from transformers import AutoProcessor
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def check_but_video(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    with mock.patch.object(AutoVideoProcessor, "from_pretrained", return_value=None), \
            mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_but_video):
        # the PIL backend (vlmkit's resize) where torchvision is installed too: with it the default
        # image processor resizes with torchvision's bicubic, which differs by a few 1e-2 at tile edges
        for kw in ({"backend": "pil"}, {"use_fast": False}, {}):
            try:
                return AutoProcessor.from_pretrained(out, **kw)
            except (TypeError, ValueError):
                continue
        raise AssertionError(f"no processor loads from {out}")


def frames(tok):
    return tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_generation_match(case, exported):
    from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

    model, out = exported[case]
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(hf, InternVLForConditionalGeneration)
    n = model.encoder.model.config.num_hidden_layers
    assert hf.config.vision_feature_layer == {"norm": n, "layer2": -2}.get(case, -1)
    assert hf.config.image_token_id == model.image_token_id  # the context token is vlmkit's image token
    proc = load_processor(out)
    # a batch of two prompts (the processor left-pads), one image each, of different tile counts
    ims = [image(*SIZES[0]), image(*SIZES[1], seed=1)]
    texts = [proc.apply_chat_template([{"role": "user", "content": f"{CTX}\n{q}"}], add_generation_prompt=True)
             for q in (QUESTION, "How many shapes are there?")]
    enc = proc(text=texts, images=ims, return_tensors="pt", add_special_tokens=False, padding=True)
    ids, mask, px = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
    start, end = frames(proc.tokenizer)
    assert (ids == start).sum() == 2 and (ids == end).sum() == 2
    # vlmkit runs the same ids: the context token is its placeholder, tiles in the same order
    sizes = torch.tensor([im.size for im in ims])
    with torch.no_grad():
        ref = model.logits(ids, mask, px, image_sizes=sizes, images_per_sample=[1, 1])
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    keep = mask.bool()
    assert got.shape == ref.shape
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=0)

    one = proc(text=texts[0], images=ims[:1], return_tensors="pt", add_special_tokens=False)
    new_ref = model.generate(one["input_ids"], None, one["pixel_values"], max_new_tokens=8, min_new_tokens=8,
                             image_sizes=sizes[:1])
    new_got = hf.generate(**one, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, one["input_ids"].shape[1]:]
    assert new_got.tolist() == new_ref.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_processor_matches_vlmkit(case, exported):
    model, out = exported[case]
    proc = load_processor(out)
    assert type(proc).__name__ == "InternVLProcessor" and proc.image_token == CTX
    assert proc.image_seq_length == model.count_image_tokens.tokens_per_tile
    ref = model.processor()
    start, end = frames(proc.tokenizer)
    for k, (w, h) in enumerate(SIZES + [(16, 16), (100, 7), (64, 64)]):
        im = image(w, h, seed=k)
        want = ref(PROMPT, [im], add_generation_prompt=True)
        text = proc.apply_chat_template([{"role": "user", "content": f"{CTX}\n{QUESTION}"}],
                                        add_generation_prompt=True)
        enc = proc(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
        got = enc["input_ids"][0].tolist()
        # InternVL's layout: <img> + the placeholders + </img>; without the frame it is vlmkit's sequence
        n = model.count_image_tokens(w, h)
        i = got.index(start)
        assert got[i + 1: i + 1 + n] == [model.image_token_id] * n and got[i + 1 + n] == end
        assert [t for t in got if t not in (start, end)] == want["input_ids"].tolist(), (w, h)
        torch.testing.assert_close(enc["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)
        # structured content, tokenized by apply_chat_template itself
        msgs = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": QUESTION}]}]
        enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        assert enc["input_ids"][0].tolist() == got
    # token counts over many sizes: InternVL's (+2 for the frame) and vlmkit's (one image per sample)
    rng = random.Random(0)
    sizes = [(rng.randint(1, 120), rng.randint(1, 120)) for _ in range(300)]
    counts = proc._get_num_multimodal_tokens(image_sizes=[[h, w] for w, h in sizes])["num_image_tokens"]
    assert counts == [model.count_image_tokens(w, h) + 2 for w, h in sizes]


@pytest.mark.parametrize("case", list(CASES))
def test_export_import_export_is_exact(case, exported, tmp_path):
    model, out = exported[case]
    back = import_model(out)
    assert back.config.template == "vicuna_v1" and back.config.llm.image_token == CTX
    assert back.config.connector.name == "pixel_shuffle" and back.config.connector.options == {"scale": 0.5}
    assert back.config.tiling == model.config.tiling and back.encoder.image_size == model.encoder.image_size
    assert back.encoder.feature_layer == {"norm": 3}.get(case, model.encoder.feature_layer)
    assert back.image_token_id == model.image_token_id
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(export_model(back, tmp_path / "again") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the imported model computes what the original did, and trains (the vlmkit loss path)
    im = image(*SIZES[0])
    p = model.processor()(PROMPT + [{"from": "gpt", "value": "a red circle"}], [im])
    with torch.no_grad():
        torch.testing.assert_close(back.logits(p["input_ids"][None], None, p["pixel_values"], p["image_sizes"]),
                                   model.logits(p["input_ids"][None], None, p["pixel_values"], p["image_sizes"]),
                                   atol=1e-4, rtol=0)
    loss = back(p["input_ids"][None], None, p["pixel_values"], p["labels"][None], image_sizes=p["image_sizes"])
    loss.backward()
    assert torch.isfinite(loss) and back.connector.layer_norm.weight.grad is not None


def test_frame_tokens_added_when_missing(tmp_path, encoder_dirs, llm_dir):
    """A tokenizer without <img> / </img> / <video>: the export adds them, their rows the mean of the others;
    the image token stays the context token; logits on the old vocabulary are vlmkit's, a new token's logit
    is the mean logit (never the greedy pick)."""
    from transformers import AutoModelForImageTextToText

    cfg = model_config(encoder_dirs["internvit"], llm_dir, "internvit", feature_layer=-1)
    cfg.connector, cfg.tiling = ConnectorConfig("pixel_shuffle"), TilingConfig("internvl", max_tiles=4)
    torch.manual_seed(0)
    model = VLM.from_config(cfg).eval()
    V = len(model.tokenizer)
    assert model.llm.get_input_embeddings().weight.shape[0] == V
    out = export_internvl(model, tmp_path / "out")
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = load_processor(out)
    assert proc.image_token == "<image>" and proc.image_token_id == model.image_token_id
    assert [proc.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<video>")] == [V, V + 1, V + 2]
    emb = model.llm.get_input_embeddings().weight
    got = hf.get_input_embeddings().weight
    assert got.shape == (V + 3, emb.shape[1]) and hf.config.text_config.vocab_size == V + 3
    assert torch.equal(got[:V], emb)
    torch.testing.assert_close(got[V:], emb.mean(0, keepdim=True).expand(3, -1), atol=1e-6, rtol=0)
    ids = torch.tensor([model.tokenizer("What color is the shape?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model.logits(ids)
        logits = hf(input_ids=ids).logits
    torch.testing.assert_close(logits[..., :V], ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[..., V:], ref.mean(-1, keepdim=True).expand(-1, -1, 3), atol=1e-4, rtol=0)
    assert "not trained by vlmkit" in (out / "README.md").read_text()


def test_loads_without_vlmkit(exported, tmp_path):
    """A plain python process (vlmkit never imported) loads the model, tokenizer and image processor and gives
    the same logits; AutoProcessor there needs torchvision (InternVL's video processor) and nothing else."""
    model, out = exported["tiled"]
    proc = load_processor(out)
    text = proc.apply_chat_template([{"role": "user", "content": f"{CTX}\n{QUESTION}"}], add_generation_prompt=True)
    enc = proc(text=text, images=[image(*SIZES[0])], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ref = model.logits(enc["input_ids"], None, enc["pixel_values"], torch.tensor([SIZES[0]]))
    image(*SIZES[0]).save(tmp_path / "im.png")
    script = textwrap.dedent(f"""
        import sys, json, torch, importlib.util
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        out = {str(out)!r}
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        try:  # PIL's resize, as vlmkit's (with torchvision installed the default resizes with torchvision)
            ip = AutoImageProcessor.from_pretrained(out, backend="pil")
        except (TypeError, ValueError):
            ip = AutoImageProcessor.from_pretrained(out)
        px = ip(images=[Image.open({str(tmp_path / 'im.png')!r})], crop_to_patches=True, return_tensors="pt")
        n = int(px["num_patches"][0]) * {proc.image_seq_length}
        ids = torch.tensor([{enc["input_ids"][0].tolist()}])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=px["pixel_values"]).logits
        torch.save(logits, {str(tmp_path / 'out.pt')!r})
        try:
            AutoProcessor.from_pretrained(out)
            err = None
        except Exception as e:
            err = str(e)
        print(json.dumps({{"vlmkit_loaded": any(m.split(".")[0] == "vlmkit" for m in sys.modules),
                          "class": type(model).__name__, "tokens": [tok.start_image_token, tok.end_image_token,
                          tok.context_image_token], "placeholders": int((ids == model.config.image_token_id).sum()),
                          "n": n, "torchvision": importlib.util.find_spec("torchvision") is not None,
                          "processor_error": err}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["vlmkit_loaded"] is False and info["class"] == "InternVLForConditionalGeneration"
    assert info["tokens"] == ["<img>", "</img>", CTX] and info["placeholders"] == info["n"]
    if info["torchvision"]:
        assert info["processor_error"] is None
    else:
        # the only thing missing: our InternVLVideoProcessor entry is found and wants torchvision
        assert "InternVLVideoProcessor requires the Torchvision library" in info["processor_error"], \
            info["processor_error"]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="InternVLProcessor builds a video processor, which needs torchvision (absent here)")
def test_autoprocessor_with_torchvision(exported):
    from transformers import AutoProcessor

    model, out = exported["tiled"]
    proc = AutoProcessor.from_pretrained(out)
    ref = load_processor(out)
    text = ref.apply_chat_template([{"role": "user", "content": f"{CTX}\n{QUESTION}"}], add_generation_prompt=True)
    im = image(*SIZES[0])
    a = proc(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
    b = ref(text=text, images=[im], return_tensors="pt", add_special_tokens=False)
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=0.05, rtol=0)


@pytest.mark.parametrize("change, match", [
    ({"tiling": TilingConfig("internvl", max_tiles=4, thumbnail=False)}, "thumbnail"),
    ({"tiling": TilingConfig("anyres")}, "AnyRes"),
])
def test_internvl_options_it_lacks_refused(change, match, parts, tmp_path):
    model = build("tiled", parts, **change)
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pad_without_tiling_refused(parts, tmp_path):
    model = build("single", parts)
    model.config.encoder.image_aspect = "pad"
    with pytest.raises(ValueError, match="pad"):
        export_internvl(model, tmp_path / "out")


@pytest.mark.parametrize("enc_case, connector, match", [
    ("internvit", ConnectorConfig("mlp2x_gelu"), "internvit.*InternVL"),
    ("clip", ConnectorConfig("pixel_shuffle"), "clip.*InternViT"),
    ("dinov2", ConnectorConfig("pixel_shuffle"), "dinov2.*InternViT"),
    ("internvit", ConnectorConfig("qformer", {"num_queries": 4, "hidden_size": 16, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "intermediate_size": 32}),
     "qformer.*Q-Former"),
    ("clip", ConnectorConfig("qformer", {"num_queries": 4, "hidden_size": 16, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "intermediate_size": 32}), "qformer.*Q-Former"),
    ("clip", ConnectorConfig("perceiver_resampler", {"num_latents": 4, "heads": 2}), "resampler"),
    ("clip", ConnectorConfig("avgpool_mlp", {"kernel": 2}), "average pooling"),
])
def test_parts_no_native_class_holds_refused(enc_case, connector, match, encoder_dirs, llm_dir, tmp_path):
    """Each combination gets an error naming the part; vlmkit's own format still saves and loads it."""
    cfg = model_config(encoder_dirs[enc_case], llm_dir, enc_case)
    cfg.connector = connector
    model = VLM.from_config(cfg)
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "own")
    assert VLM.from_pretrained(tmp_path / "own").config.connector.name == connector.name


def test_cli_export_and_import(exported, tmp_path):
    from vlmkit.cli import main

    model, _ = exported["tiled"]
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "internvl"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "InternVLForConditionalGeneration" in card and "pixel_shuffle" in card and "max(1, 6 // n)" in card
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = VLM.from_pretrained(tmp_path / "back")
    p = model.processor()(PROMPT, [image(*SIZES[0])], add_generation_prompt=True)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(p["input_ids"][None], None, p["pixel_values"], p["image_sizes"]),
                                   model.logits(p["input_ids"][None], None, p["pixel_values"], p["image_sizes"]),
                                   atol=1e-4, rtol=0)
