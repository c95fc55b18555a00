"""Kind `fused`: DINOv2 + SigLIP side by side (prismatic), features concatenated per patch.

DINOv2 (patch 4 at 16px) and SigLIP (patch 5 at 20px) both give a 4x4 grid, like DINOv2/14 at 224 and
SigLIP/16 at 256; their normalisations differ (ImageNet vs 0.5/0.5), so the SigLIP member sees the
input re-normalised and resized inside the fused module.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit import VLM
from vlmkit.config import ConfigError, ConnectorConfig, DataConfig, EncoderConfig, LLMConfig, ModelConfig, StageConfig
from vlmkit.config import from_dict, to_dict
from vlmkit.encoders import HALF, IMAGENET_MEAN, IMAGENET_STD, FusedEncoder, build_encoder, encoder_geometry
from vlmkit.model import build_processor
from vlmkit.stages import apply_stage, param_groups, validate_plan

_VIT = dict(intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
DINO = dict(model_type="dinov2", image_size=16, patch_size=4, hidden_size=32, **_VIT)
SIGLIP = dict(model_type="siglip_vision_model", image_size=20, patch_size=5, hidden_size=24, **_VIT)


def save(kw: dict, d, seed: int) -> str:
    from transformers import AutoConfig, AutoModel

    kw = dict(kw)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw)).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {"dinov2": save(DINO, tmp_path_factory.mktemp("dino"), 0),
            "siglip": save(SIGLIP, tmp_path_factory.mktemp("siglip"), 1),
            "siglip8": save(dict(SIGLIP, image_size=16, patch_size=8), tmp_path_factory.mktemp("siglip8"), 2)}


def fused_cfg(dirs, second="siglip", **kw) -> EncoderConfig:
    return EncoderConfig(name="fused", members=[EncoderConfig(name="dinov2", path=dirs["dinov2"], **kw),
                                                EncoderConfig(name="siglip2", path=dirs[second])])


def hf(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def test_fused_features_are_each_member_on_its_own_input(dirs):
    enc = build_encoder(fused_cfg(dirs)).eval()
    assert isinstance(enc, FusedEncoder)
    assert (enc.image_size, enc.grid, enc.out_dim, enc.num_tokens) == (16, (4, 4), 32 + 24, 16)
    assert (enc.mean, enc.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the first member's: the data side's
    raw = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # pixels in [0, 1]

    def norm(x, mean, std):
        return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)

    x = norm(raw, IMAGENET_MEAN, IMAGENET_STD)  # what the processor gives
    dino, sig = hf(dirs["dinov2"]), hf(dirs["siglip"])
    with torch.no_grad():
        out = enc(x)  # [2, 16, 56]
        # DINOv2 runs on the input as given: bit for bit its own hidden_states[-2] without CLS
        assert torch.equal(out[..., :32], dino(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:])
        # SigLIP: the slice is exactly SigLIP on the fused module's re-normalised, resized input
        xs = enc.member_input(1, x)
        assert xs.shape == (2, 3, 20, 20)
        assert torch.equal(out[..., 32:], sig(pixel_values=xs, output_hidden_states=True).hidden_states[-2])
    # ... and that input is SigLIP's own normalisation of the raw pixels, resized: exact up to rounding,
    # shown in float64 where rounding is ~1e-16
    enc64, sig64 = enc.double(), sig.double()
    raw64 = raw.double()
    own = F.interpolate(norm(raw64, HALF, HALF), size=(20, 20), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        got = enc64(norm(raw64, IMAGENET_MEAN, IMAGENET_STD))[..., 32:]
        ref = sig64(pixel_values=own, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(enc64.member_input(1, norm(raw64, IMAGENET_MEAN, IMAGENET_STD)), own, atol=1e-12, rtol=0)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    assert not torch.allclose(own, F.interpolate(raw64, size=(20, 20), mode="bicubic", antialias=True))  # non-trivial


def test_members_keep_their_feature_layer(dirs):
    cfg = EncoderConfig(name="fused", members=[EncoderConfig(name="dinov2", path=dirs["dinov2"], feature_layer=-1),
                                               EncoderConfig(name="siglip2", path=dirs["siglip"], feature_layer=1)])
    enc = build_encoder(cfg).eval()
    assert [m.feature_layer for m in enc.members] == [-1, 1]
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = enc(x)
        assert torch.equal(out[..., :32], hf(dirs["dinov2"])(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:])
        assert torch.equal(out[..., 32:], hf(dirs["siglip"])(pixel_values=enc.member_input(1, x),
                                                              output_hidden_states=True).hidden_states[1])


def test_grid_mismatch_names_each_member(dirs):
    cfg = fused_cfg(dirs, second="siglip8")  # SigLIP patch 8 at 16px: 2x2 against DINOv2's 4x4
    msg = (r"patch grids differ \(dinov2 at image_size 16 / patch 4 -> 4x4; siglip2 at image_size 16 / patch 8 -> "
           r"2x2\).*e\.g\. siglip2 image_size 32")
    with pytest.raises(ValueError, match=msg):
        encoder_geometry(cfg)  # config alone (what the data side reads)
    with pytest.raises(ValueError, match=msg):
        build_encoder(cfg)
    cfg.members[1].image_size = 32  # the fix the message suggests
    assert encoder_geometry(cfg).grid == (4, 4)


def test_fused_config_parsing_and_errors(dirs):
    data = {"encoder": {"name": "fused", "image_aspect": "resize",
                        "members": [{"name": "dinov2", "path": dirs["dinov2"], "feature_layer": -1},
                                    {"name": "siglip2", "path": dirs["siglip"]}]},
            "llm": {"path": "x"}}
    m = from_dict(ModelConfig, data, "model")
    assert [type(e).__name__ for e in m.encoder.members] == ["EncoderConfig"] * 2
    assert m.encoder.members[0].feature_layer == -1 and m.encoder.members[1].name == "siglip2"
    assert from_dict(ModelConfig, to_dict(m), "model") == m
    with pytest.raises(ConfigError, match=r"members\[1\]: unknown keys \['layer'\]"):
        from_dict(ModelConfig, {**data, "encoder": {"name": "fused", "members": [
            {"name": "dinov2", "path": "a"}, {"name": "siglip2", "path": "b", "layer": 3}]}}, "model")
    with pytest.raises(ConfigError, match="at least 2"):
        EncoderConfig(name="fused", members=[{"name": "dinov2", "path": "a"}])
    with pytest.raises(ConfigError, match=r"set \['image_size', 'path'\] on its members"):
        EncoderConfig(name="fused", path="a", image_size=224, members=[{"name": "dinov2", "path": "a"},
                                                                       {"name": "clip", "path": "b"}])
    with pytest.raises(ConfigError, match="cannot itself be fused"):
        EncoderConfig(name="fused", members=[{"name": "dinov2", "path": "a"},
                                             {"name": "fused", "members": [{"name": "clip", "path": "b"}] * 2}])
    with pytest.raises(ConfigError, match="only for name: fused"):
        EncoderConfig(name="clip", path="a", members=[{"name": "dinov2", "path": "a"}] * 2)


@pytest.fixture
def fused_vlm(dirs, llm_dir):
    config = ModelConfig(encoder=fused_cfg(dirs), connector=ConnectorConfig("mlp2x_gelu"), llm=LLMConfig(path=llm_dir))
    torch.manual_seed(0)
    return config, VLM.from_config(config)


def sample(proc):
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
    s = proc(conv, [Image.new("RGB", (20, 12), (200, 30, 30))])
    return {"input_ids": s["input_ids"][None], "attention_mask": torch.ones_like(s["input_ids"])[None],
            "pixel_values": s["pixel_values"], "labels": s["labels"][None]}


def stage(plan):
    return StageConfig(name="s", train=plan, data=DataConfig(path="x.json"), lr=1e-3)


def test_fused_vlm_trains_saves_and_reloads(fused_vlm, tmp_path):
    config, model = fused_vlm
    assert model.connector.linear_1.in_features == 56 and model.count_image_tokens(16, 16) == 16
    proc = build_processor(config)  # from config.json-level facts only, no encoder weights
    b = sample(proc)
    assert int((b["input_ids"] == model.image_token_id).sum()) == 16 == model.encoder.num_tokens
    s2 = sample(model.processor())
    assert all(torch.equal(b[k], s2[k]) for k in b)  # same ids, pixels (DINOv2's normalisation) as the model's
    st = stage({"encoder": "full", "connector": "full", "llm": "full"})
    apply_stage(model, st.train, st.lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, st), lr=st.lr)
    loss = model(**b)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = {n.split(".")[2] for n, p in model.named_parameters()
             if n.startswith("encoder.members.") and not torch.equal(p, before[n])}
    assert moved == {"0", "1"}  # both members learn
    model.eval().save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    enc = saved["encoder"]
    assert enc["name"] == "fused" and "path" not in enc and len(enc["members"]) == 2  # a FusedEncoderConfig's keys
    assert [(m["path"], m["config"]["model_type"], m["image_size"]) for m in enc["members"]] == \
        [(None, "dinov2", 16), (None, "siglip_vision_model", 20)]
    assert from_dict(ModelConfig, saved, "model").encoder.members[1].image_mean == list(HALF)
    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded.encoder, FusedEncoder)
    with torch.no_grad():
        assert torch.equal(loaded.logits(**b), model.logits(**b))
    from vlmkit.model import load_processor

    b3 = sample(load_processor(tmp_path / "m"))  # processor of the saved folder (weights unread)
    assert all(torch.equal(b[k], b3[k]) for k in b)


def test_fused_stage_modes(fused_vlm):
    _, model = fused_vlm
    apply_stage(model, {"connector": "full"})  # frozen encoder: no gradient, no autograd graph
    model(**sample(model.processor())).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    model.zero_grad()
    rows = apply_stage(model, stage({"encoder": {"mode": "lora", "r": 2}, "connector": "full"}).train)
    lora = [n for n, p in model.encoder.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert {n.split(".")[1] for n in lora} == {"0", "1"}  # adapters on both members
    assert rows[0]["component"] == "encoder" and 0 < rows[0]["trainable"] < rows[0]["params"]
    model(**sample(model.processor())).backward()
    # both members' adapters learn (those of blocks after feature_layer -2 and of SigLIP's unused head do not)
    grads = {n.split(".")[1] for n in lora if model.encoder.get_parameter(n).grad is not None
             and model.encoder.get_parameter(n).grad.abs().sum() > 0}
    assert grads == {"0", "1"}
    with pytest.raises(ValueError, match="partial does not work with a fused encoder"):
        validate_plan(model, stage({"encoder": {"mode": "partial", "layers": 1}, "connector": "full"}))


def test_export_refuses_fused(fused_vlm, dirs, llm_dir, tmp_path):
    from vlmkit.export import check_exportable, export_model

    with pytest.raises(ValueError, match=r"cannot export encoder 'fused' \(dinov2\+siglip_vision_model\).*one vision tower"):
        check_exportable(fused_vlm[1])
    with pytest.raises(ValueError, match=r"cannot export encoder 'fused'"):
        export_model(fused_vlm[1], tmp_path / "llava")
    # with pixel shuffle the InternVL exporter is asked: it refuses too, by name
    shuffle = VLM.from_config(ModelConfig(encoder=fused_cfg(dirs), connector=ConnectorConfig("pixel_shuffle"),
                                          llm=LLMConfig(path=llm_dir)))
    assert shuffle.count_image_tokens(16, 16) == 4  # 4x4 fused grid -> 2x2
    with pytest.raises(ValueError, match=r"cannot export encoder 'fused' \(dinov2\+siglip_vision_model\) to InternVL"):
        export_model(shuffle, tmp_path / "internvl")
    # FSDP's wrap policy sees both members' block classes
    assert {"Dinov2Layer", "SiglipEncoderLayer"} <= set(fused_vlm[1]._no_split_modules)
