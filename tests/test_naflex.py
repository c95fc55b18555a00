"""SigLIP 2 NaFlex (`model.tiling.mode: naflex`): each image at its own aspect ratio and patch grid.

References: transformers' SigLIP 2 image processor (its PIL backend, `Siglip2ImageProcessorPil`: the
torchvision one is not installed here) for sizes, grids and pixel patches; `Siglip2VisionModel` for
features. Tiny NaFlex encoder from conftest: patch 4, num_patches 16 (a 4x4 position table), width 32.
Image sizes are (width, height); patch grids (rows, cols), the processor's `spatial_shapes` order.
"""
import json
import math
import random

import pytest
import torch
from PIL import Image
from transformers import AutoModel
from transformers.models.siglip2.image_processing_pil_siglip2 import (
    Siglip2ImageProcessorPil, get_image_size_for_max_num_patches)

from conftest import model_config
from vlmkit import VLM
from vlmkit import tiling as T
from vlmkit.config import ConfigError, ConnectorConfig, TilingConfig, from_dict
from vlmkit.data import collate
from vlmkit.data.images import ImageTransform
from vlmkit.encoders import EncoderGeometry
from vlmkit.model import ImageTokenCounter, build_processor, load_processor
from vlmkit.registry import CONNECTORS
from vlmkit.stages import apply_stage

PATCH, NUM_PATCHES = 4, 16  # the conftest NaFlex encoder
# tiny options for the connectors whose defaults are BERT-base / 64 latents
CONNECTORS_UNDER_TEST = {
    "mlp2x_gelu": {},
    "pixel_shuffle": {"scale": 0.5},
    "avgpool_mlp": {"kernel": 2},
    "qformer": {"num_queries": 5, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64, "dropout": 0.0},
    "perceiver_resampler": {"num_latents": 6, "depth": 1, "heads": 2},
}


def random_sizes(n: int, seed: int, max_side: int = 20_000, max_area: int | None = None):
    """(width, height) from 1x1 to very wide / very tall, log-uniform per side (area capped when asked:
    these images are really decoded), plus fixed extremes."""
    rng = random.Random(seed)
    out = [(1, 1), (1, 2), (2, 1), (1, max_side), (max_side, 1), (3, 5_000), (5_000, 3), (16, 16), (17, 16),
           (4, 64), (64, 4), (47, 47), (300, 400), (400, 300)]
    if max_area:
        out = [s for s in out if s[0] * s[1] <= max_area]
    while len(out) < n:
        w = int(math.exp(rng.uniform(0, math.log(max_side))))
        h = int(math.exp(rng.uniform(0, math.log(max_side))))
        if max_area and w * h > max_area:  # keep the aspect, shrink the area
            s = math.sqrt(max_area / (w * h))
            w, h = max(1, int(w * s)), max(1, int(h * s))
        out.append((w, h))
    return out


def noise(size, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy(), "RGB")


def conv(n_images: int, answer: str = "red"):
    text = "".join(f"<image>\nWhat color is the shape {'one two three'.split()[k % 3]}? " for k in range(n_images))
    return [{"from": "human", "value": text or "hello"}, {"from": "gpt", "value": answer}]


def naflex_config(encoder_dirs, llm_dir, connector: str = "mlp2x_gelu", **tiling):
    cfg = model_config(encoder_dirs["siglip2_naflex"], llm_dir, "siglip2_naflex")
    cfg.connector = ConnectorConfig(connector, dict(CONNECTORS_UNDER_TEST[connector]))
    cfg.tiling = TilingConfig("naflex", **tiling)
    return cfg


@pytest.fixture(scope="module")
def model(encoder_dirs, llm_dir):
    torch.manual_seed(0)
    return VLM.from_config(naflex_config(encoder_dirs, llm_dir)).eval()


def hf_processor(max_num_patches: int, patch: int = PATCH) -> Siglip2ImageProcessorPil:
    return Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_num_patches,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)


# ---- 1. data side == Siglip2ImageProcessor -------------------------------------------------------------
@pytest.mark.parametrize("patch,max_patches", [(4, 16), (16, 256), (14, 729), (16, 1024), (16, 37)])
def test_size_rule_equals_siglip2(patch, max_patches):
    """2000 sizes (1x1 .. 20000x1 .. 1x20000) per (patch, max_num_patches): the resize target equals
    transformers' get_image_size_for_max_num_patches, the grid never exceeds the budget."""
    for w, h in random_sizes(2000, seed=patch * max_patches):
        ref_h, ref_w = get_image_size_for_max_num_patches(h, w, patch, max_patches)
        assert T.naflex_size((w, h), patch, max_patches) == (ref_w, ref_h), (w, h)
        rows, cols = T.naflex_grid((w, h), patch, max_patches)
        assert (rows, cols) == (ref_h // patch, ref_w // patch) and 1 <= rows * cols <= max_patches


def test_processor_pixels_and_grids_equal_siglip2(model):
    """300 random-noise images through vlmkit's Processor vs Siglip2ImageProcessorPil (max_num_patches 16):
    same spatial_shapes, same patches. Tolerance 1e-6: both resize the uint8 image with PIL's bilinear filter
    (identical uint8 pixels); transformers rescales in float64 then casts, vlmkit divides in float32, so
    values differ by at most a float32 rounding (~1e-7 after / 0.5), while one grey level is 7.8e-3."""
    proc, ref = model.processor(), hf_processor(NUM_PATCHES)
    assert proc.tiling.patch == PATCH and proc.tiling.max_num_patches == NUM_PATCHES  # the checkpoint's num_patches
    sizes = random_sizes(300, seed=7, max_side=5_000, max_area=300_000)
    for start in range(0, len(sizes), 3):
        ims = [noise(s, start + k) for k, s in enumerate(sizes[start:start + 3])]
        ours = proc(conv(len(ims)), ims)
        theirs = ref(ims, return_tensors="pt")
        grids = [proc.tiling.grid(im.size) for im in ims]
        assert theirs["spatial_shapes"].tolist() == [list(g) for g in grids]
        assert ours["tiles_per_image"].tolist() == [1] * len(ims)
        assert ours["pixel_values"].shape == (len(ims), max(r * c for r, c in grids), 3 * PATCH * PATCH)
        for k, (rows, cols) in enumerate(grids):
            n = rows * cols
            assert theirs["pixel_attention_mask"][k].tolist() == [1] * n + [0] * (NUM_PATCHES - n)
            torch.testing.assert_close(ours["pixel_values"][k, :n], theirs["pixel_values"][k, :n], atol=1e-6, rtol=0)
            assert not ours["pixel_values"][k, n:].any()  # zero padding after the image's own patches


@pytest.mark.parametrize("patch,max_patches", [(16, 256), (14, 64)])
def test_patches_equal_siglip2_at_checkpoint_sizes(patch, max_patches):
    """The pure functions at real checkpoint sizes (SigLIP 2 naflex: patch 16, 256 patches), 60 images."""
    ref, transform = hf_processor(max_patches, patch), ImageTransform(patch, (0.5,) * 3, (0.5,) * 3)
    for k, size in enumerate(random_sizes(60, seed=patch, max_side=3_000, max_area=400_000)):
        im = noise(size, k)
        theirs = ref(im, return_tensors="pt")
        ours = T.naflex_patches(transform.normalize(T.naflex_resize(im, patch, max_patches)), patch)
        rows, cols = T.naflex_grid(size, patch, max_patches)
        assert theirs["spatial_shapes"].tolist() == [[rows, cols]] and ours.shape == (rows * cols, 3 * patch ** 2)
        torch.testing.assert_close(ours, theirs["pixel_values"][0, :rows * cols], atol=1e-6, rtol=0)


# ---- 2. encoder == Siglip2VisionModel on the processor's output -----------------------------------------
@pytest.mark.parametrize("max_patches", [16, 40])
def test_encoder_features_equal_siglip2_vision_model(encoder_dirs, llm_dir, max_patches):
    """A batch of differently shaped images: vlmkit's encoder (patches padded to the batch's longest) gives
    transformers' Siglip2VisionModel hidden_states[-2] on Siglip2ImageProcessor's output (padded to
    max_num_patches) for every real patch; each image alone (no padding) gives the same features.
    40 > the checkpoint's 16: its 4x4 position table is resized up, as SigLIP 2 does."""
    torch.manual_seed(0)
    m = VLM.from_config(naflex_config(encoder_dirs, llm_dir, max_num_patches=max_patches)).eval()
    hf = AutoModel.from_pretrained(encoder_dirs["siglip2_naflex"]).eval()
    ims = [noise(s, k) for k, s in enumerate([(40, 10), (10, 40), (33, 33), (1, 1), (300, 7), (64, 48), (5, 90)])]
    ref = hf_processor(max_patches)(ims, return_tensors="pt")
    with torch.no_grad():
        want = hf(**ref, output_hidden_states=True).hidden_states[-2]  # [N, max_patches, C]
        b = collate([m.processor()(conv(len(ims)), ims)], m.tokenizer.pad_token_id)
        grids = [m.tiling.grid(im.size) for im in ims]
        got = m.encoder(b["pixel_values"], grids)  # [N, L, C]
        assert got.shape[1] == max(r * c for r, c in grids)  # padded to the batch's longest, not to max_patches
        for k, (rows, cols) in enumerate(grids):
            n = rows * cols
            torch.testing.assert_close(got[k, :n], want[k, :n], atol=1e-5, rtol=1e-5)
            alone = m.encoder(b["pixel_values"][k:k + 1, :n], [(rows, cols)])[0]  # no padding at all
            torch.testing.assert_close(alone, want[k, :n], atol=1e-5, rtol=1e-5)
    assert len(set(grids)) >= 5  # the images really have different grids


def test_padding_never_reaches_the_llm(encoder_dirs, llm_dir):
    """Noise written into the padding patches changes no logit, and gets no gradient (encoder trained)."""
    torch.manual_seed(0)
    model = VLM.from_config(naflex_config(encoder_dirs, llm_dir)).eval()
    proc = model.processor()
    b = collate([proc(conv(2), [noise((40, 10), 0), noise((50, 30), 1)]), proc(conv(1), [noise((100, 30), 2)])],
                model.tokenizer.pad_token_id)
    grids = [model.tiling.grid(tuple(s)) for s in b["image_sizes"].tolist()]
    real = torch.zeros(b["pixel_values"].shape[:2], dtype=torch.bool)
    for k, (rows, cols) in enumerate(grids):
        real[k, :rows * cols] = True
    assert (~real).any()  # some images are padded
    keys = {k: b[k] for k in ("image_sizes", "images_per_sample", "tiles_per_image")}
    with torch.no_grad():
        ref = model.logits(b["input_ids"], b["attention_mask"], b["pixel_values"], **keys)
        noisy = b["pixel_values"].clone()
        noisy[~real] = torch.randn(int((~real).sum()), noisy.shape[-1]) * 5
        assert torch.equal(model.logits(b["input_ids"], b["attention_mask"], noisy, **keys), ref)
    apply_stage(model, {"encoder": "full", "connector": "full"})
    px = b["pixel_values"].clone().requires_grad_(True)
    model.train()
    model(b["input_ids"], b["attention_mask"], px, b["labels"], **keys).backward()
    assert px.grad[real].abs().sum() > 0 and not px.grad[~real].any()


# ---- 3. placeholders == merged features, every connector -----------------------------------------------
@pytest.mark.parametrize("connector", list(CONNECTORS_UNDER_TEST))
def test_counter_equals_connector_output_for_any_size(connector):
    """3000 sizes x 3 budgets: the counter's count is the length the connector returns for that image's grid
    (the connector run once per distinct grid, on features of that grid)."""
    opts = CONNECTORS_UNDER_TEST[connector]
    torch.manual_seed(0)
    conn = CONNECTORS.get(connector)(32, 16, **opts).eval()
    geo = EncoderGeometry(16, PATCH, 16, (0.5,) * 3, (0.5,) * 3, (4, 4), 32, naflex_patches=NUM_PATCHES)
    out_len: dict = {}
    for max_patches in (16, 64, 257):
        counter = ImageTokenCounter.for_config((4, 4), ConnectorConfig(connector, dict(opts)),
                                               TilingConfig("naflex", max_num_patches=max_patches), 16, geo)
        for w, h in random_sizes(3000, seed=max_patches):
            rows, cols = grid = counter.tiling.grid((w, h))
            assert rows * cols <= max_patches
            if grid not in out_len:
                with torch.no_grad():
                    out_len[grid] = conn(torch.zeros(1, rows * cols, 32), grid).shape[1]
            assert counter(w, h) == out_len[grid], (w, h, grid)
    assert len(out_len) > 50


def test_pixel_shuffle_rounds_grids_to_even(encoder_dirs, llm_dir):
    """pixel_shuffle folds 2x2 patch blocks: the NaFlex rule then sizes images in 2-patch units (every grid even,
    still at most max_num_patches); SigLIP 2's own rule would give odd sides. A budget below one 2x2 block is
    an error naming it."""
    proc = build_processor(naflex_config(encoder_dirs, llm_dir, "pixel_shuffle"))
    assert proc.tiling.multiple == 2
    odd = 0
    for w, h in random_sizes(2000, seed=3):
        rows, cols = proc.tiling.grid((w, h))
        assert rows % 2 == 0 and cols % 2 == 0 and rows * cols <= NUM_PATCHES
        assert proc.count_image_tokens(w, h) == rows * cols // 4
        odd += any(v % 2 for v in T.naflex_grid((w, h), PATCH, NUM_PATCHES))
    assert odd > 100
    with pytest.raises(ValueError, match=r"max_num_patches 3 is below one 2x2 block"):
        build_processor(naflex_config(encoder_dirs, llm_dir, "pixel_shuffle", max_num_patches=3))


def check_batch(m, samples):
    b = collate(samples, m.tokenizer.pad_token_id)
    with torch.no_grad():  # embed raises on any per-image / per-sample / total count mismatch
        embeds = m.embed(b["input_ids"], b["pixel_values"], b["image_sizes"], b["images_per_sample"],
                         b["tiles_per_image"])
    mask = b["input_ids"] == m.image_token_id
    start = 0
    for r, n in enumerate(b["images_per_sample"].tolist()):
        sizes = b["image_sizes"][start:start + n].tolist()
        start += n
        assert int(mask[r].sum()) == sum(m.count_image_tokens(w, h) for w, h in sizes)
    assert embeds.shape[:2] == b["input_ids"].shape


@pytest.mark.parametrize("connector", list(CONNECTORS_UNDER_TEST))
def test_placeholders_equal_merged_features(encoder_dirs, llm_dir, connector):
    """The real processor and model.embed, 600 sizes per connector, 1-3 images a sample, 4 samples a batch
    (the mlp2x_gelu case runs over 1500 sizes in test_highres' property test)."""
    torch.manual_seed(0)
    m = VLM.from_config(naflex_config(encoder_dirs, llm_dir, connector)).eval()
    proc, rng = m.processor(), random.Random(2)
    sizes = random_sizes(600, seed=11, max_area=400_000)
    samples, i = [], 0
    while i < len(sizes):
        n = rng.choice([1, 1, 2, 3])
        samples.append(proc(conv(len(sizes[i:i + n])), [Image.new("RGB", s, (200, 30, 30)) for s in sizes[i:i + n]]))
        i += n
        if len(samples) == 4:
            check_batch(m, samples)
            samples = []
    if samples:
        check_batch(m, samples)


# ---- 4. training, save / load, processor from config -------------------------------------------------
def test_trains_saves_reloads_and_processor_from_config_counts_the_same(encoder_dirs, llm_dir, tmp_path):
    torch.manual_seed(0)
    cfg = naflex_config(encoder_dirs, llm_dir, "pixel_shuffle")
    m = VLM.from_config(cfg)
    proc = m.processor()
    ims = [noise((90, 20), 0), noise((20, 20), 1), noise((13, 200), 2)]
    samples = [proc(conv(2), ims[:2]), proc(conv(1, "green"), ims[2:])]
    b = collate(samples, m.tokenizer.pad_token_id)
    apply_stage(m, {"encoder": "full", "connector": "full", "llm": "full"})
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in m.encoder.named_parameters()}
    loss0 = m(**b)
    loss0.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1 = m(**b)
    assert torch.isfinite(loss0) and loss1 < loss0
    assert any(not torch.equal(p, before[n]) for n, p in m.encoder.named_parameters())  # the encoder trained
    packed = collate(samples, m.tokenizer.pad_token_id, pack=True)
    with torch.no_grad():
        torch.testing.assert_close(m(**packed), loss1)  # packed rows: same loss
    text_only = proc(conv(0), [])
    assert text_only["pixel_values"].shape == (0, 0, 3 * PATCH * PATCH)
    mixed = collate([text_only, samples[1]], m.tokenizer.pad_token_id)
    assert mixed["pixel_values"].shape[0] == 1 and mixed["images_per_sample"].tolist() == [0, 1]
    m(**mixed).backward()  # a text-only sample next to an image sample
    opt.zero_grad(set_to_none=True)
    m(**collate([text_only], m.tokenizer.pad_token_id)).backward()  # no image at all: the encoder still runs
    assert m.encoder.model.embeddings.patch_embedding.weight.grad is not None  # (a zero gradient, for DDP / ZeRO)
    opt.zero_grad()

    m.eval()
    m.save_pretrained(tmp_path / "m")
    saved = json.load(open(tmp_path / "m" / "config.json"))["model"]["tiling"]
    assert saved["mode"] == "naflex" and saved["max_num_patches"] is None
    back = VLM.from_pretrained(tmp_path / "m").eval()
    assert back.count_image_tokens == m.count_image_tokens and back.tiling.multiple == 2
    keys = ("image_sizes", "images_per_sample", "tiles_per_image")
    with torch.no_grad():
        ref = m.logits(b["input_ids"], b["attention_mask"], b["pixel_values"], **{k: b[k] for k in keys})
        got = back.logits(b["input_ids"], b["attention_mask"], b["pixel_values"], **{k: b[k] for k in keys})
    assert torch.equal(ref, got)
    for other in (build_processor(cfg), load_processor(tmp_path / "m")):
        assert other.count_image_tokens == m.count_image_tokens and other.tiling == m.tiling
        out = other(conv(2), ims[:2])
        assert all(out[k].equal(samples[0][k]) for k in ("input_ids", "pixel_values", "image_sizes", "tiles_per_image"))
    out = back.generate(b["input_ids"][:1], None, b["pixel_values"][:2], max_new_tokens=2,
                        image_sizes=b["image_sizes"][:2])
    assert out.shape[0] == 1


# ---- config and errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,needle", [
    (dict(mode="anyres", max_num_patches=64), "max_num_patches is a naflex option"),
    (dict(mode="naflex", max_num_patches=0), "max_num_patches must be a positive integer"),
    (dict(mode="naflex", max_num_patches="256"), "max_num_patches must be a positive integer"),
])
def test_config_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(TilingConfig, bad, "model.tiling")


def test_naflex_needs_a_naflex_encoder(encoder_dirs, llm_dir):
    for case in ("clip", "siglip"):  # SigLIP (1) has a fixed position table
        cfg = model_config(encoder_dirs[case], llm_dir, case)
        cfg.tiling = TilingConfig("naflex")
        with pytest.raises(ValueError, match="tiling.mode naflex needs a NaFlex SigLIP 2 encoder"):
            build_processor(cfg)


def test_mismatched_pixels_are_named(model):
    proc = model.processor()
    b = collate([proc(conv(2), [noise((40, 10), 0), noise((9, 9), 1)])], model.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"naflex: image sizes \[\(40, 10\), \(9, 9\)\] \(width, height\) give "
                                         r"patch grids \[\(2, 8\), \(4, 4\)\]"):
        model.embed(b["input_ids"], b["pixel_values"][:, :10], b["image_sizes"], b["images_per_sample"])
    with pytest.raises(ValueError, match="patch sequences"):
        model.embed(b["input_ids"], torch.zeros(2, 3, 16, 16), b["image_sizes"], b["images_per_sample"])


def test_blank_images_for_evaluation(model):
    proc = model.processor()
    p = proc(conv(1), [noise((40, 10), 0)])
    blank = proc.blank_like(p["pixel_values"])
    assert blank.shape == p["pixel_values"].shape
    want = proc.transform.normalize(Image.new("RGB", (PATCH, PATCH), proc.transform.fill))
    assert torch.equal(blank[0, 0], T.naflex_patches(want, PATCH)[0])
