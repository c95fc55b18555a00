"""High-resolution tiling wired through config, processor, counter and model (vlmkit.highres).

The property that matters: for every tiling mode and every image size, the placeholders the
processor writes equal the features the model merges, image by image and sample by sample.
Tiny CLIP (16px tiles, patch 4: 16 tokens per tile) + mlp2x_gelu + tiny Llama; sizes are (width, height).
Mode naflex runs the tiny NaFlex SigLIP 2 (patch 4, at most 16 patches per image) instead of CLIP.
"""
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import model_config
from vlmkit import VLM
from vlmkit import tiling as T
from vlmkit.config import ConfigError, ModelConfig, TilingConfig, from_dict, to_dict
from vlmkit.data import collate
from vlmkit.highres import TileSpec
from vlmkit.model import ImageTokenCounter, build_processor, load_processor
from vlmkit.stages import apply_stage

PINS = "(1x1),...,(3x3)"
MODES = {
    "none": TilingConfig(),
    "anyres": TilingConfig("anyres", PINS),
    "anyres_nounpad": TilingConfig("anyres", PINS, unpad=False),
    "anyres_max": TilingConfig("anyres", PINS, anyres_max=2),
    "anyres_llava_next": TilingConfig("anyres"),  # LLaVA-NeXT's default canvases
    "internvl": TilingConfig("internvl", max_tiles=6),
    "naflex": TilingConfig("naflex"),  # SigLIP 2: one image, its own patch grid (tests/test_naflex.py)
}
EXTREME = [(1, 1), (1, 2), (2, 1), (1, 20_000), (20_000, 1), (3, 5_000), (5_000, 3), (16, 16), (17, 16),
           (32, 16), (16, 32), (48, 16), (16, 48), (47, 47), (64, 64), (400, 300), (300, 400)]


def random_sizes(n: int, seed: int, max_side: int = 20_000, max_area: int = 400_000):
    """(width, height) from 1x1 to very wide / very tall, log-uniform per side, area capped (memory)."""
    rng = random.Random(seed)
    out = [s for s in EXTREME if max(s) <= max_side]
    while len(out) < n:
        w = int(math.exp(rng.uniform(0, math.log(max_side))))
        h = int(math.exp(rng.uniform(0, math.log(max_side))))
        if w * h > max_area:  # keep the aspect, shrink the area
            s = math.sqrt(max_area / (w * h))
            w, h = max(1, int(w * s)), max(1, int(h * s))
        out.append((w, h))
    return out


def tiled_config(encoder_dirs, llm_dir, tiling: TilingConfig) -> ModelConfig:
    case = "siglip2_naflex" if tiling.mode == "naflex" else "clip"
    cfg = model_config(encoder_dirs[case], llm_dir, case)
    cfg.tiling = tiling
    return cfg


@pytest.fixture(scope="module")
def models(encoder_dirs, llm_dir):
    """mode -> a tiny VLM with that tiling (same encoder / LLM weights; built once)."""
    out = {}
    for name, tiling in MODES.items():
        torch.manual_seed(0)
        out[name] = VLM.from_config(tiled_config(encoder_dirs, llm_dir, tiling)).eval()
    return out


def conv(n_images: int, answer: str = "red"):
    """Several <image> interleaved with text in one conversation."""
    text = "".join(f"<image>\nWhat color is the shape {'one two three'.split()[k % 3]}? " for k in range(n_images))
    return [{"from": "human", "value": text or "hello"}, {"from": "gpt", "value": answer}]


def image(size, k=0):
    return Image.new("RGB", size, [(220, 40, 40), (40, 170, 60), (40, 80, 220)][k % 3])


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,needle", [
    (dict(mode="tiles"), "tiling.mode must be one of none, anyres, internvl"),
    (dict(mode="anyres", anyres_max=4, unpad=False), "anyres_max needs unpad"),
    (dict(mode="anyres", anyres_max=0), "anyres_max must be a positive integer"),
    (dict(mode="anyres", grid_pinpoints="nonsense"), "tiling.grid_pinpoints"),
    (dict(mode="internvl", min_tiles=4, max_tiles=2), "min_tiles <= max_tiles"),
    (dict(mode="anyres", unpad="yes"), "tiling.unpad must be true or false"),
    (dict(mode="anyres", bogus=1), r"unknown keys \['bogus'\]"),
])
def test_tiling_config_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(TilingConfig, bad, "model.tiling")


def test_tiling_config_from_yaml_dict_and_default(encoder_dirs, llm_dir):
    d = to_dict(model_config(encoder_dirs["clip"], llm_dir))
    assert d["tiling"]["mode"] == "none"
    d["tiling"] = {"mode": "anyres", "grid_pinpoints": [[32, 16], [16, 32]], "anyres_max": 3}
    cfg = from_dict(ModelConfig, d, "model")
    assert cfg.tiling == TilingConfig("anyres", [[32, 16], [16, 32]], anyres_max=3)
    spec = TileSpec.from_config(cfg.tiling, 16)
    assert spec.pinpoints == ((32, 16), (16, 32))
    assert TileSpec.from_config(TilingConfig(), 16) is None
    assert TileSpec.from_config(TilingConfig("anyres"), 336).pinpoints == (
        (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # LLaVA-NeXT's image_grid_pinpoints
    with pytest.raises(ValueError, match="not multiples of the encoder's tile size 16px"):
        TileSpec.from_config(TilingConfig("anyres", [[20, 16]]), 16)


def test_no_tiling_is_unchanged(models, vlm):
    """Default config: one tile per image, no image_newline, the same components and counts."""
    m = models["none"]
    assert m.tiling is None and m.image_newline is None and list(m.components()) == ["encoder", "connector", "llm"]
    assert "image_newline" not in dict(m.named_parameters())
    assert m.count_image_tokens(5000, 3) == 16 and m.count_image_tokens.num_tiles(5000, 3) == 1
    p = m.processor()(conv(1), [image((40, 10))])
    assert p["pixel_values"].shape == (1, 3, 16, 16) and p["tiles_per_image"].tolist() == [1]


# ---- the property: placeholders == merged features ------------------------------------------------
def check_batch(model, samples):
    b = collate(samples, model.tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], b["pixel_values"], b["image_sizes"], b["images_per_sample"],
                             b["tiles_per_image"])
    mask = b["input_ids"] == model.image_token_id
    counter = model.count_image_tokens
    start = 0
    for r, n in enumerate(b["images_per_sample"].tolist()):
        sizes = b["image_sizes"][start:start + n].tolist()
        start += n
        assert int(mask[r].sum()) == sum(counter(w, h, n) for w, h in sizes)
    assert embeds.shape[:2] == b["input_ids"].shape
    return b, embeds, mask


@pytest.mark.parametrize("mode", list(MODES))
def test_placeholders_equal_merged_features_for_any_size(models, mode):
    """1500 sizes per mode (1x1 .. 20000x1 .. 1x20000), 1-3 images per sample, 4 samples per batch, the
    real processor and model.embed (which raises on any per-image / per-sample count mismatch)."""
    model = models[mode]
    proc = model.processor()
    rng = random.Random(1)
    # mode none pads to a square before resizing (LLaVA-1.5): a 20000x1 image would become 20000x20000
    sizes = random_sizes(1500 if mode != "anyres_llava_next" else 500, seed=list(MODES).index(mode),
                         max_side=1000 if mode == "none" else 20_000)
    samples, i = [], 0
    while i < len(sizes):
        n = rng.choice([1, 1, 2, 3])
        imgs = [image(s, k) for k, s in enumerate(sizes[i:i + n])]
        i += n
        samples.append(proc(conv(len(imgs)), imgs))
        if len(samples) == 4:
            check_batch(model, samples)
            samples = []
    if samples:
        check_batch(model, samples)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(w=st.integers(1, 100_000), h=st.integers(1, 100_000), n=st.integers(1, 4),
       mode=st.sampled_from(sorted(set(MODES) - {"none", "naflex"})))
def test_counter_equals_pack_length(w, h, n, mode):
    """Without images: the counter's count is the length `pack` gives for that many tiles (any size).
    (naflex: one tile of its own grid; test_naflex runs each connector on each grid instead.)"""
    spec = TileSpec.from_config(MODES[mode], 16)
    counter = ImageTokenCounter((4, 4), "mlp2x_gelu", (), spec)
    feats = torch.zeros(counter.num_tiles(w, h, n), 16, 8)
    assert spec.pack(feats, (w, h), torch.zeros(8)).shape == (counter(w, h, n), 8)


# ---- layout: tile order, newline positions, budgets --------------------------------------------
def test_anyres_pixels_base_first_then_row_major(models):
    m = models["anyres"]
    proc = m.processor()
    im = Image.effect_noise((40, 20), 64).convert("RGB")
    p = proc(conv(1), [im])
    tiles = T.anyres_tiles(im, PINS, 16)
    rows, cols = T.anyres_grid(im.size, PINS, 16)
    assert (rows, cols) == (2, 3) and len(tiles) == 7  # 40x20 fits a 48x32 canvas without downscaling
    assert p["pixel_values"].shape == (7, 3, 16, 16) and p["tiles_per_image"].tolist() == [7]
    for k, t in enumerate(tiles):
        assert torch.equal(p["pixel_values"][k], proc.transform(t))
    assert p["image_sizes"].tolist() == [[40, 20]]


def test_internvl_pixels_row_major_then_thumbnail_and_budget(models):
    m = models["internvl"]
    proc = m.processor()
    im = Image.effect_noise((64, 32), 64).convert("RGB")
    one = proc(conv(1), [im])
    tiles = T.internvl_tiles(im, 16, 1, 6)
    assert len(tiles) == one["pixel_values"].shape[0] == one["tiles_per_image"].item() > 2
    for k, t in enumerate(tiles):
        assert torch.equal(one["pixel_values"][k], proc.transform(t))
    # two images share max_tiles 6: each gets max(1, 6 // 2) = 3 tiles (+ thumbnail)
    two = proc(conv(2), [im, im])
    per = T.internvl_num_tiles(im.size, 16, 1, 3)
    assert two["tiles_per_image"].tolist() == [per, per] and per <= 4
    assert (two["input_ids"] == m.image_token_id).sum() == 2 * per * 16
    four = proc(conv(4), [im] * 4)  # 6 // 4 = 1 tile each, no thumbnail
    assert four["tiles_per_image"].tolist() == [1] * 4


def test_anyres_newline_after_each_row_and_base_first(models):
    m = models["anyres"]
    im = Image.effect_noise((40, 20), 64).convert("RGB")
    b, embeds, mask = check_batch(m, [m.processor()(conv(1), [im])])
    with torch.no_grad():
        feats = m.encode_images(b["pixel_values"])  # [3, 16, D]
    got = embeds[mask]  # [L, D]
    info = T.anyres_feature_grid(im.size, PINS, 16, 4)
    assert got.shape[0] == 16 + info["h"] * (info["w"] + 1)
    assert torch.equal(got[:16], feats[0])  # the base tile's tokens first, no newline
    rows = got[16:].view(info["h"], info["w"] + 1, -1)
    assert torch.equal(rows[:, -1], m.image_newline.detach().expand(info["h"], -1))
    assert not torch.equal(rows[:, 0], m.image_newline.detach().expand(info["h"], -1))


def test_image_newline_init_and_stage_plan(encoder_dirs, llm_dir):
    torch.manual_seed(0)
    m = VLM.from_config(tiled_config(encoder_dirs, llm_dir, MODES["anyres"]))
    d = m.llm.config.hidden_size
    assert m.image_newline.shape == (d,) and "image_newline" in m.components()
    assert 0.3 / math.sqrt(d) < m.image_newline.std().item() < 3 / math.sqrt(d)  # randn / sqrt(D)
    rows = apply_stage(m, {"connector": "full", "image_newline": "full"})
    assert {r["component"]: r["trainable"] for r in rows}["image_newline"] == d
    p = m.processor()(conv(1), [image((60, 20))])
    b = collate([p], m.tokenizer.pad_token_id)
    m(**b).backward()
    assert m.image_newline.grad is not None and m.image_newline.grad.abs().sum() > 0
    apply_stage(m, {"connector": "full"})
    assert not m.image_newline.requires_grad


# ---- errors ---------------------------------------------------------------------------------------
def test_mismatch_errors_name_expected_and_found(models):
    m = models["anyres"]
    proc = m.processor()
    s1, s2 = proc(conv(1), [image((40, 20))]), proc(conv(2), [image((20, 60)), image((5, 5))])
    b = collate([s1, s2], m.tokenizer.pad_token_id)
    bad = dict(b, tiles_per_image=b["tiles_per_image"].flip(0))
    with pytest.raises(ValueError, match=r"image tile mismatch: image sizes \[\(40, 20\), \(20, 60\), \(5, 5\)\]"):
        m.embed(bad["input_ids"], bad["pixel_values"], bad["image_sizes"], bad["images_per_sample"],
                bad["tiles_per_image"])
    ids = b["input_ids"].clone()
    ids[0, (ids[0] == m.image_token_id).nonzero()[0]] = 5  # one placeholder of sample 0 becomes text ...
    assert ids[1, 1] != m.image_token_id
    ids[1, 1] = m.image_token_id  # ... and sample 1 gets one more: same total, wrong per sample
    with pytest.raises(ValueError, match=r"sample 0: its 1 image\(s\) give \[\d+\] features \(expected \d+\), "
                                         r"its text holds \d+ placeholder"):
        m.embed(ids, b["pixel_values"], b["image_sizes"], b["images_per_sample"], b["tiles_per_image"])
    with pytest.raises(ValueError, match="needs image_sizes"):
        m.embed(b["input_ids"], b["pixel_values"])
    ids = b["input_ids"].clone()
    ids[ids == m.image_token_id] = 5
    with pytest.raises(ValueError, match=r"image token mismatch: 3 image\(s\) give \d+ features \(expected \d+\), "
                                         r"the text holds 0 placeholder"):
        m.embed(ids, b["pixel_values"], b["image_sizes"], b["images_per_sample"], b["tiles_per_image"])


# ---- save / load, processor from config, export --------------------------------------------------
@pytest.mark.parametrize("mode", ["anyres", "internvl"])
def test_save_load_keeps_tiling_and_newline(models, encoder_dirs, llm_dir, tmp_path, mode):
    m = models[mode]
    m.save_pretrained(tmp_path / "m")
    saved = json.load(open(tmp_path / "m" / "config.json"))["model"]["tiling"]
    assert saved == to_dict(MODES[mode])
    back = VLM.from_pretrained(tmp_path / "m").eval()
    assert back.count_image_tokens == m.count_image_tokens
    s = [m.processor()(conv(2), [image((70, 20)), image((9, 30), 1)])]
    b = collate(s, m.tokenizer.pad_token_id)
    keys = ("image_sizes", "images_per_sample", "tiles_per_image")
    with torch.no_grad():
        ref = m.logits(b["input_ids"], b["attention_mask"], b["pixel_values"], **{k: b[k] for k in keys})
        got = back.logits(b["input_ids"], b["attention_mask"], b["pixel_values"], **{k: b[k] for k in keys})
    assert torch.equal(ref, got)
    if mode == "anyres":
        assert torch.equal(back.image_newline, m.image_newline)
    for proc in (load_processor(tmp_path / "m"), build_processor(tiled_config(encoder_dirs, llm_dir, MODES[mode]))):
        assert proc.count_image_tokens == m.count_image_tokens and proc.tiling == m.tiling
        out = proc(conv(2), [image((70, 20)), image((9, 30), 1)])
        assert all(out[k].equal(s[0][k]) for k in ("input_ids", "pixel_values", "image_sizes", "tiles_per_image"))


def test_generate_with_tiling(models):
    m = models["internvl"]
    proc = m.processor()
    prompts = [proc(conv(n)[:1], [image((30 * (k + 1), 17), k) for k in range(n)], add_generation_prompt=True)
               for n in (1, 2)]
    b = collate(prompts, m.tokenizer.pad_token_id, padding_side="left")
    out = m.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens=3,
                     image_sizes=b["image_sizes"], images_per_sample=b["images_per_sample"])
    assert out.shape[0] == 2


def test_export_refuses_tiling(models, tmp_path):
    from vlmkit.export import export_llava

    with pytest.raises(ValueError, match="cannot export anyres tiling to Llava"):
        export_llava(models["anyres"], tmp_path / "x")


def test_llava_next_7b_config_is_llava_next_anyres():
    from pathlib import Path

    from vlmkit.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "recipes" / "configs" / "llava_next_7b.yaml")
    spec = TileSpec.from_config(cfg.model.tiling, 336)  # CLIP ViT-L/14-336: 24 x 24 patches per tile
    assert spec.pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)) and spec.uses_newline
    counter = ImageTokenCounter((24, 24), "mlp2x_gelu", (), spec)
    assert counter(672, 672) == 576 + 48 * 49 and counter.num_tiles(672, 672) == 5
    assert counter(1008, 336) == 576 + 24 * (72 + 1)
    assert "image_newline" in cfg.stages[0].train and cfg.stages[1].train["encoder"].lr == 2e-6
