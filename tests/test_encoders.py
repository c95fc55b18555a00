"""Encoders: every family builds (random config and save_pretrained dir) and drops exactly its prefix tokens."""
import numpy as np
import pytest
import torch

from conftest import ENCODER_CASES, IMAGE_SIZE, PATCHES, build_hf_encoder, model_config
from vlmkit import VLM
from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
from vlmkit.encoders import build_encoder

# prefix tokens the transformers model puts before the patches: CLS (+ registers); SigLIP has none
EXPECTED_PREFIX = {"clip": 1, "siglip": 0, "siglip2_naflex": 0, "dinov2": 1, "dinov2_registers": 1 + 4,
                   "internvit": 1}
CASES = list(ENCODER_CASES)


def pixels(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def reference_hidden_states(hf_model, case, x):
    """The transformers model run by hand, in its own input format."""
    with torch.no_grad():
        if case == "siglip2_naflex":
            from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

            p = hf_model.config.patch_size
            # transformers' own patchifier (its PIL image processor): [C, H, W] -> [P, p*p*C]
            patches = np.stack([convert_image_to_patches(im.numpy(), p) for im in x])
            n, g = x.shape[0], IMAGE_SIZE // p
            return hf_model(pixel_values=torch.from_numpy(patches),
                            pixel_attention_mask=torch.ones(n, g * g, dtype=torch.long),
                            spatial_shapes=torch.tensor([[g, g]] * n), output_hidden_states=True).hidden_states
        return hf_model(pixel_values=x, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("case", CASES)
def test_encoder_from_random_config(case):
    name, kw = ENCODER_CASES[case]
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(name=name, config=dict(kw)))
    assert enc.model.config.model_type == kw["model_type"]
    assert enc.out_dim == 32
    assert enc.image_size == IMAGE_SIZE
    assert enc.grid == (4, 4)
    assert enc.num_tokens == PATCHES
    assert enc.num_prefix_tokens == EXPECTED_PREFIX[case]
    with torch.no_grad():
        out = enc(pixels(3))
    assert out.shape == (3, PATCHES, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES)
def test_vlm_from_random_configs(case, tok_dir):
    """Every part random (encoder and LLM from config dicts), mlp2x_gelu in between."""
    from conftest import LLM_KW

    name, kw = ENCODER_CASES[case]
    cfg = ModelConfig(encoder=EncoderConfig(name=name, config=dict(kw)), connector=ConnectorConfig("mlp2x_gelu"),
                      llm=LLMConfig(config=dict(LLM_KW, hidden_size=48), tokenizer=tok_dir))
    torch.manual_seed(0)
    model = VLM.from_config(cfg)
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)  # <image> included
    assert model.encoder.out_dim == 32 and model.encoder.num_tokens == PATCHES
    assert (model.connector.linear_1.in_features, model.connector.linear_1.out_features) == (32, 48)
    with torch.no_grad():
        assert model.encode_images(pixels(2)).shape == (2, PATCHES, 48)


@pytest.mark.parametrize("case", CASES)
def test_vlm_with_each_encoder_from_saved_dir(case, encoder_dirs, llm_dir):
    """encoder dir (as a hub id would be) + mlp2x_gelu + LLM dir: weights loaded, features the right shape."""
    torch.manual_seed(0)
    model = VLM.from_config(model_config(encoder_dirs[case], llm_dir, case))
    hf = build_hf_encoder(case)  # the same seed wrote the saved dir
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(model.encoder.model.state_dict().items())):
        assert k == k2 and torch.equal(a, b), f"{case}: {k} not loaded from the saved dir"
    assert model.encoder.out_dim == 32 and model.encoder.num_tokens == PATCHES
    assert model.connector.linear_1.in_features == model.encoder.out_dim
    assert model.connector.linear_2.out_features == model.llm.config.hidden_size
    assert model.count_image_tokens(IMAGE_SIZE, IMAGE_SIZE) == PATCHES
    with torch.no_grad():
        feats = model.encode_images(pixels(2))
    assert feats.shape == (2, PATCHES, model.llm.config.hidden_size)
    # the whole path: one image in a prompt, loss is finite
    proc = model.processor()
    from PIL import Image

    img = Image.new("RGB", (20, 12), (200, 30, 30))
    s = proc([{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}], [img])
    assert int((s["input_ids"] == model.image_token_id).sum()) == PATCHES
    assert s["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        loss = model(s["input_ids"][None], torch.ones_like(s["input_ids"])[None], s["pixel_values"], s["labels"][None])
    assert torch.isfinite(loss)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer", [-1, -2])
def test_prefix_tokens_dropped_exactly(case, layer):
    """VisionEncoder == hidden_states[layer][:, prefix:] of the transformers model, bit for bit."""
    from vlmkit.encoders import VisionEncoder

    hf = build_hf_encoder(case).eval()
    enc = VisionEncoder(ENCODER_CASES[case][0], hf, feature_layer=layer).eval()
    x = pixels(2, seed=1)
    hs = reference_hidden_states(hf, case, x)
    assert len(hs) == hf.config.num_hidden_layers + 1
    k = EXPECTED_PREFIX[case]
    assert hs[layer].shape[1] == PATCHES + k  # the model's sequence: prefix + (size / patch)^2
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (2, PATCHES, 32)
    assert torch.equal(out, hs[layer][:, k:])
    if k == 0:  # SigLIP: every token is a patch; nothing may be dropped
        assert torch.equal(out, hs[layer])


@pytest.mark.parametrize("case", CASES)
def test_feature_layer_selects_hidden_state(case):
    hf = build_hf_encoder(case).eval()
    from vlmkit.encoders import VisionEncoder

    x = pixels(1, seed=2)
    with torch.no_grad():
        a = VisionEncoder(ENCODER_CASES[case][0], hf, -2)(x)
        b = VisionEncoder(ENCODER_CASES[case][0], hf, -1)(x)
        c = VisionEncoder(ENCODER_CASES[case][0], hf, 1)(x)
    hs = reference_hidden_states(hf, case, x)
    k = EXPECTED_PREFIX[case]
    assert not torch.allclose(a, b)
    assert torch.equal(a, hs[-2][:, k:]) and torch.equal(b, hs[-1][:, k:]) and torch.equal(c, hs[1][:, k:])


def test_feature_layer_out_of_range_and_wrong_family():
    from vlmkit.encoders import VisionEncoder

    hf = build_hf_encoder("clip")
    with pytest.raises(ValueError, match="feature_layer"):
        VisionEncoder("clip", hf, feature_layer=-5)  # 3 layers: hidden_states has 4 entries
    with pytest.raises(ValueError, match="dinov2"):
        VisionEncoder("dinov2", hf, feature_layer=-2)  # a CLIP model under the DINOv2 name


@pytest.mark.parametrize("case,full_type", [("clip", "clip"), ("siglip", "siglip")])
def test_vision_tower_from_full_checkpoint(case, full_type, tmp_path):
    """Hub ids such as openai/clip-vit-large-patch14-336 hold a full (text + vision) model:
    the vision weights must be loaded, not left random."""
    from transformers import AutoConfig, AutoModel

    vkw = dict(ENCODER_CASES[case][1])
    vkw.pop("model_type")
    cfg = AutoConfig.for_model(full_type, vision_config=vkw,
                               text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, vocab_size=50))
    torch.manual_seed(3)
    full = AutoModel.from_config(cfg)
    full.save_pretrained(str(tmp_path))
    enc = build_encoder(EncoderConfig(name=ENCODER_CASES[case][0], path=str(tmp_path)))
    ref = full.vision_model.state_dict()  # the vision tower of the full model
    got = enc.model.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_processor_stats_from_checkpoint(encoder_dirs, tmp_path):
    """image_mean / image_std come from preprocessor_config.json when present, else the family default."""
    import json
    import shutil

    from vlmkit.encoders import CLIP_MEAN, CLIP_STD

    enc = build_encoder(EncoderConfig(name="clip", path=encoder_dirs["clip"]))
    assert enc.mean == CLIP_MEAN and enc.std == CLIP_STD
    d = tmp_path / "enc"
    shutil.copytree(encoder_dirs["clip"], d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                            "image_std": [0.4, 0.5, 0.6]}))
    enc = build_encoder(EncoderConfig(name="clip", path=str(d)))
    assert enc.mean == (0.1, 0.2, 0.3) and enc.std == (0.4, 0.5, 0.6)


def test_vision_tower_loads_from_a_composite_checkpoint(tmp_path):
    """encoder.path may name a whole transformers-native VLM (here InternVL -hf, tower under model.vision_tower.):
    the tower's weights are found under their prefix, never silently left random."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, LlamaConfig

    vision = dict(ENCODER_CASES["internvit"][1])
    vision.pop("model_type")
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    full = InternVLForConditionalGeneration(InternVLConfig(vision_config=vision, text_config=text.to_dict(),
                                                           image_token_id=5))
    full.save_pretrained(tmp_path / "internvl-hf")
    enc = build_encoder(EncoderConfig(name="internvit", path=str(tmp_path / "internvl-hf")))
    tower = full.model.vision_tower.state_dict()
    mine = enc.model.state_dict()
    assert set(tower) == set(mine)
    for k, v in tower.items():
        assert torch.equal(mine[k], v), k

    # a checkpoint without the tower's weights anywhere: an error naming what is missing
    from transformers import AutoConfig, LlamaForCausalLM

    LlamaForCausalLM(text).save_pretrained(tmp_path / "llm")
    cfg = AutoConfig.for_model("internvl_vision", **vision)
    cfg.save_pretrained(tmp_path / "llm")  # the vision config, but no vision weights
    with pytest.raises(ValueError, match="not in the checkpoint"):
        build_encoder(EncoderConfig(name="internvit", path=str(tmp_path / "llm")))


@pytest.mark.parametrize("case", CASES)
def test_position_init_std_redraws_only_the_position_table(case):
    """encoder.position_init_std: the position table from N(0, std); every other weight as the model's own init."""
    from vlmkit.encoders import position_table

    name, kw = ENCODER_CASES[case]
    torch.manual_seed(0)
    plain = build_encoder(EncoderConfig(name=name, config=dict(kw)))
    torch.manual_seed(0)
    drawn = build_encoder(EncoderConfig(name=name, config=dict(kw), position_init_std=0.5))
    table = position_table(drawn.model)
    positions = PATCHES + (0 if case.startswith("siglip") else 1)  # CLS has a position; registers, SigLIP none
    assert table is not None and table.numel() == positions * 32
    assert abs(table.std().item() - 0.5) < 0.05 and abs(table.mean().item()) < 0.05
    same = {k: v for k, v in plain.model.state_dict().items()}
    for k, v in drawn.model.state_dict().items():
        if v.data_ptr() == table.data_ptr():
            assert not torch.equal(v, same[k]), k
        else:
            assert torch.equal(v, same[k]), k


def test_random_internvit_knows_patch_position_only_with_a_drawn_table():
    """transformers initialises InternViT's position table to zeros: a uniform image then gives every patch the
    same feature (the frozen random tower says nothing about where a patch is); with position_init_std it does."""
    from vlmkit.encoders import position_table

    name, kw = ENCODER_CASES["internvit"]
    flat = torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), 0.3)
    for std, differ in ((None, False), (0.02, True)):
        torch.manual_seed(0)
        enc = build_encoder(EncoderConfig(name=name, config=dict(kw), position_init_std=std))
        if std is None:
            assert not position_table(enc.model).any()  # zeros
        with torch.no_grad():
            f = enc(flat)[0]  # [P, C]
        spread = (f - f[:1]).abs().max().item()
        assert (spread > 1e-3) is differ, (std, spread)


def test_position_init_std_survives_save_and_reload(tmp_path, tok_dir):
    """The drawn table is saved with the model; from_pretrained loads it instead of drawing a new one."""
    from conftest import LLM_KW
    from vlmkit.encoders import position_table

    name, kw = ENCODER_CASES["internvit"]
    cfg = ModelConfig(encoder=EncoderConfig(name=name, config=dict(kw), position_init_std=0.02),
                      connector=ConnectorConfig("mlp2x_gelu"), llm=LLMConfig(config=dict(LLM_KW), tokenizer=tok_dir))
    torch.manual_seed(0)
    model = VLM.from_config(cfg)
    model.save_pretrained(tmp_path / "m")
    torch.manual_seed(1)  # a reload that drew again would differ
    back = VLM.from_pretrained(tmp_path / "m")
    assert torch.equal(position_table(back.encoder.model), position_table(model.encoder.model))
    assert position_table(back.encoder.model).any()


def test_position_init_std_refusals(encoder_dirs):
    from vlmkit.config import ConfigError

    name, kw = ENCODER_CASES["internvit"]
    with pytest.raises(ConfigError, match="overwrite trained weights"):
        EncoderConfig(name=name, path=encoder_dirs["internvit"], position_init_std=0.02)
    for bad in (0, -1.0, "0.02"):
        with pytest.raises(ConfigError, match="position_init_std must be a number > 0"):
            EncoderConfig(name=name, config=dict(kw), position_init_std=bad)
    with pytest.raises(ConfigError, match="on its members, not on the fused encoder"):
        EncoderConfig(name="fused", position_init_std=0.02,
                      members=[dict(name=name, config=dict(kw)), dict(name=name, config=dict(kw))])
    convnext = dict(model_type="convnext", image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_stages=3)
    with pytest.raises(ValueError, match="encoder 'hf'.*no learned absolute position table"):
        build_encoder(EncoderConfig(name="hf", config=convnext, position_init_std=0.02))
