"""Kind `hf` (any transformers vision backbone) and running encoders at another input size.

Tiny random ViT, DeiT, BEiT, Swin, ConvNeXt and SAM vision models are saved with save_pretrained and
loaded by path. Their patch tokens must equal the transformers model's own outputs, sliced or flattened
independently here; the grid read from the config alone (meta-device forward) must match the real one.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import ENCODER_CASES, build_hf_encoder
from vlmkit import VLM
from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
from vlmkit.encoders import IMAGENET_MEAN, build_encoder, encoder_geometry
from vlmkit.model import build_processor
from vlmkit.stages import apply_stage, param_groups, validate_plan

_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
HF_CASES = {
    # case: (transformers config kwargs, image size, grid, width, prefix tokens)
    "vit": (dict(model_type="vit", image_size=16, patch_size=4, **_VIT), 16, (4, 4), 32, 1),
    "deit": (dict(model_type="deit", image_size=16, patch_size=4, **_VIT), 16, (4, 4), 32, 2),  # CLS + distillation
    "beit": (dict(model_type="beit", image_size=16, patch_size=4, **_VIT), 16, (4, 4), 32, 1),
    # 32px / patch 2 -> 16x16, two patch mergings -> 4x4 at 8 * 2^2 channels
    "swin": (dict(model_type="swin", image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 2],
                  window_size=2), 32, (4, 4), 32, 0),
    # 64px / stem 4 -> 16x16, two downsamplings -> 4x4 at the last stage's 32 channels
    "convnext": (dict(model_type="convnext", image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                      num_stages=3), 64, (4, 4), 32, 0),
    # SAM's ViT: hidden_states are channel-last [N, 8, 8, 32]
    "sam": (dict(model_type="sam_vision_model", image_size=32, patch_size=4, hidden_size=32, output_channels=16,
                 num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[1], window_size=4),
            32, (8, 8), 32, 0),
}
HIERARCHICAL = {"swin", "convnext"}


def hf_model(case: str, seed: int = 0):
    from transformers import AutoConfig, AutoModel

    kw = dict(HF_CASES[case][0])
    torch.manual_seed(seed)
    return AutoModel.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw)).eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for case in HF_CASES:
        d = tmp_path_factory.mktemp(f"hf_{case}")
        hf_model(case).save_pretrained(str(d))
        out[case] = str(d)
    return out


def pixels(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_tokens(case: str, model, x, layer: int | None = None) -> torch.Tensor:
    """Patch tokens [N, P, C] taken from the transformers model's own output, by hand per family."""
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    if case in ("vit", "deit", "beit"):
        hs = out.hidden_states[-2 if layer is None else layer]
        k = HF_CASES[case][4]
        assert out.last_hidden_state.shape[1] - k == 16  # the model's own sequence: k special tokens + 4x4
        return hs[:, k:]
    if case == "swin":  # its flattened hidden_states are already patch tokens (no CLS)
        return out.hidden_states[-1 if layer is None else layer]
    if case == "convnext":  # [N, C, H, W]: token r * W + c is pixel (r, c)
        fmap = out.hidden_states[-1 if layer is None else layer]
        n, c, h, w = fmap.shape
        return torch.stack([fmap[:, :, r, q] for r in range(h) for q in range(w)], dim=1)
    fmap = out.hidden_states[-2 if layer is None else layer]  # sam: [N, H, W, C]
    n, h, w, c = fmap.shape
    return torch.stack([fmap[:, r, q, :] for r in range(h) for q in range(w)], dim=1)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_tokens_match_the_model_and_the_config_grid(case, hf_dirs):
    _, size, grid, width, prefix = HF_CASES[case]
    cfg = EncoderConfig(name="hf", path=hf_dirs[case])
    geo = encoder_geometry(cfg)  # config only (meta-device forward), no weights
    assert (geo.image_size, geo.grid, geo.width) == (size, grid, width)
    assert geo.mean == IMAGENET_MEAN  # no preprocessor_config.json: ImageNet's
    enc = build_encoder(cfg).eval()
    assert (enc.image_size, enc.grid, enc.out_dim, enc.num_prefix_tokens) == (size, grid, width, prefix)
    assert enc.feature_layer == (-1 if case in HIERARCHICAL else -2)  # the last stage / LLaVA's layer
    x = pixels(2, size, seed=1)
    with torch.no_grad():
        got = enc(x)
    ref = reference_tokens(case, hf_model(case), x)  # the same seed wrote the saved dir
    assert got.shape == (2, grid[0] * grid[1], width)
    assert torch.equal(got, ref)


def test_hf_stage_selection_and_errors(hf_dirs, tmp_path):
    """feature_layer indexes hidden_states: for Swin the embeddings, then each stage's output."""
    cfg = EncoderConfig(name="hf", path=hf_dirs["swin"], feature_layer=1)  # after stage 1 + patch merging
    assert (encoder_geometry(cfg).grid, encoder_geometry(cfg).width) == ((8, 8), 16)
    enc = build_encoder(cfg).eval()
    x = pixels(1, 32, seed=2)
    with torch.no_grad():
        assert torch.equal(enc(x), reference_tokens("swin", hf_model("swin"), x, layer=1))
    cfg = EncoderConfig(name="hf", path=hf_dirs["convnext"], feature_layer=0)  # the stem: 16x16 x 8
    assert (encoder_geometry(cfg).grid, encoder_geometry(cfg).width) == ((16, 16), 8)
    with pytest.raises(ValueError, match="feature_layer 4 out of range for 3 stages"):
        encoder_geometry(EncoderConfig(name="hf", path=hf_dirs["swin"], feature_layer=4))
    with pytest.raises(ValueError, match="has its own encoder kind 'clip'; use name: clip"):
        encoder_geometry(EncoderConfig(name="hf", config=dict(ENCODER_CASES["clip"][1])))
    with pytest.raises(ValueError, match="needs model_type"):
        encoder_geometry(EncoderConfig(name="hf", config={"image_size": 16}))
    # the checkpoint's preprocessor_config.json supplies the normalisation
    import shutil

    d = tmp_path / "vit"
    shutil.copytree(hf_dirs["vit"], d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    geo = encoder_geometry(EncoderConfig(name="hf", path=str(d)))
    assert (geo.mean, geo.std) == ((0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_encoder_trains_in_a_vlm_and_round_trips(case, hf_dirs, llm_dir, tmp_path):
    _, size, grid, width, _ = HF_CASES[case]
    config = ModelConfig(encoder=EncoderConfig(name="hf", path=hf_dirs[case]), connector=ConnectorConfig("mlp2x_gelu"),
                         llm=LLMConfig(path=llm_dir))
    torch.manual_seed(0)
    model = VLM.from_config(config)
    n_tok = grid[0] * grid[1]
    assert model.connector.linear_1.in_features == width and model.count_image_tokens(size, size) == n_tok
    proc = build_processor(config)  # from the config alone: the same count as the model
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
    s = proc(conv, [Image.new("RGB", (20, 12), (200, 30, 30))])
    assert int((s["input_ids"] == model.image_token_id).sum()) == n_tok
    assert s["pixel_values"].shape == (1, 3, size, size)
    batch = {"input_ids": s["input_ids"][None], "attention_mask": torch.ones_like(s["input_ids"])[None],
             "pixel_values": s["pixel_values"], "labels": s["labels"][None]}
    plan = {"encoder": "full", "connector": "full"}
    apply_stage(model, plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(param_groups(model, _stage(plan)), lr=1e-3)
    loss = model(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.connector.linear_1.weight.grad.abs().sum() > 0
    enc_grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(float(g.abs().sum()) for g in enc_grads) > 0  # gradients reach the backbone
    opt.step()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in changed) and "connector.linear_1.weight" in changed
    # saved folder is self-contained: the backbone's config inline, same logits after reloading
    model.eval().save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["model"]["encoder"]
    assert saved["path"] is None and saved["name"] == "hf" and saved["config"]["model_type"] == HF_CASES[case][0]["model_type"]
    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded.logits(**batch), model.logits(**batch))


def _stage(plan):
    from vlmkit.config import DataConfig, StageConfig

    return StageConfig(name="s", train=plan, data=DataConfig(path="x.json"), lr=1e-3)


def test_partial_refused_for_hierarchical_allowed_for_vit(hf_dirs, llm_dir):
    for case, ok in (("swin", False), ("vit", True)):
        model = VLM.from_config(ModelConfig(encoder=EncoderConfig(name="hf", path=hf_dirs[case]),
                                            llm=LLMConfig(path=llm_dir)))
        st = _stage({"encoder": {"mode": "partial", "layers": 1}, "connector": "full"})
        if ok:
            validate_plan(model, st)
        else:
            with pytest.raises(ValueError, match="partial does not work with a hierarchical swin backbone"):
                validate_plan(model, st)


def test_export_refuses_hf_encoder(hf_dirs, llm_dir):
    from vlmkit.export import check_exportable

    model = VLM.from_config(ModelConfig(encoder=EncoderConfig(name="hf", path=hf_dirs["vit"]),
                                        llm=LLMConfig(path=llm_dir)))
    with pytest.raises(ValueError, match="cannot export encoder 'hf' \\(vit\\).*token layout"):
        check_exportable(model)


# ---- resolution change ------------------------------------------------------------------------------
@pytest.mark.parametrize("case,size", [("clip", 32), ("clip", 24), ("dinov2", 32), ("internvit", 28),
                                       ("hf_vit", 32), ("hf_deit", 24), ("hf_swin", 64)])
def test_encoder_at_another_size_interpolates_position_embeddings(case, size, encoder_dirs, hf_dirs):
    """Token count from the config alone, and features == the transformers model called directly at that
    size with interpolate_pos_encoding=True (DINOv2 and InternViT interpolate without being asked)."""
    if case.startswith("hf_"):
        fam = case[3:]
        cfg, hf = EncoderConfig(name="hf", path=hf_dirs[fam], image_size=size), hf_model(fam)
    else:
        cfg = EncoderConfig(name=ENCODER_CASES[case][0], path=encoder_dirs[case], image_size=size)
        hf = build_hf_encoder(case).eval()
    native = hf.config.image_size if isinstance(hf.config.image_size, int) else hf.config.image_size[0]
    stride = 8 if case == "hf_swin" else 4
    grid = (size // stride, size // stride)
    geo = encoder_geometry(cfg)
    assert (geo.image_size, geo.native_size, geo.grid) == (size, native, grid)
    enc = build_encoder(cfg).eval()
    assert enc.grid == grid and enc.num_tokens == grid[0] * grid[1]
    x = pixels(2, size, seed=3)
    with torch.no_grad():
        got = enc(x)
        kw = {"interpolate_pos_encoding": True} if case not in ("dinov2", "internvit") else {}
        hs = hf(pixel_values=x, output_hidden_states=True, **kw).hidden_states
    layer = -1 if case in ("hf_swin", "internvit") else -2  # the last stage; InternVL's last layer
    prefix = {"hf_deit": 2, "hf_swin": 0}.get(case, 1)
    assert torch.equal(got, hs[layer][:, prefix:])
    assert got.shape == (2, grid[0] * grid[1], hf.config.hidden_size)
    if case in ("clip", "hf_vit"):  # without the interpolation the model refuses this size: the kwarg matters
        with pytest.raises(ValueError, match="doesn't match"):
            hf(pixel_values=x)


def test_convnext_runs_at_any_size_sam_is_refused(hf_dirs):
    geo = encoder_geometry(EncoderConfig(name="hf", path=hf_dirs["convnext"], image_size=96))
    assert geo.grid == (6, 6)  # no position table: the map just grows
    enc = build_encoder(EncoderConfig(name="hf", path=hf_dirs["convnext"], image_size=96)).eval()
    x = pixels(1, 96)
    with torch.no_grad():
        assert torch.equal(enc(x), reference_tokens("convnext", hf_model("convnext"), x))
    with pytest.raises(ValueError, match=r"sam_vision_model\) cannot run at image_size 64 \(native 32\): its forward "
                                         r"has no interpolate_pos_encoding"):
        encoder_geometry(EncoderConfig(name="hf", path=hf_dirs["sam"], image_size=64))
