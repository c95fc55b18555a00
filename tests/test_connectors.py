"""Connectors: pixel_shuffle (InternVL), qformer (BLIP-2), avgpool_mlp, perceiver_resampler.

Element orders pinned by hand, parity with transformers' InternVL / BLIP-2 code on copied weights,
a hand-written reference for the resampler, and each connector inside a tiny VLM: one optimizer
step, placeholders == merged features, save -> load gives identical logits.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import model_config
from vlmkit import VLM
from vlmkit.config import ConnectorConfig
from vlmkit.data import collate
from vlmkit.model import ImageTokenCounter
from vlmkit.registry import CONNECTORS
from vlmkit.stages import apply_stage


# ---- pixel_shuffle --------------------------------------------------------------------------------
def test_pixel_shuffle_element_order_by_hand():
    from connectors.pixel_shuffle import pixel_shuffle

    x = torch.arange(32.0).reshape(1, 16, 2)  # a 4x4 grid, patch p = (r, c) holds channels [2p, 2p + 1]
    out = pixel_shuffle(x.reshape(1, 4, 4, 2), 2).reshape(1, 4, 8)
    expected = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 11],         # patches (0,0) (0,1) (1,0) (1,1)
                             [4, 5, 6, 7, 12, 13, 14, 15],       # patches (0,2) (0,3) (1,2) (1,3)
                             [16, 17, 18, 19, 24, 25, 26, 27],   # patches (2,0) (2,1) (3,0) (3,1)
                             [20, 21, 22, 23, 28, 29, 30, 31]])  # patches (2,2) (2,3) (3,2) (3,3)
    assert torch.equal(out[0], expected.float())


@pytest.mark.parametrize("rows,cols,scale", [(4, 4, 0.5), (6, 4, 0.5), (4, 8, 0.5), (8, 8, 0.25), (3, 3, 1.0)])
def test_pixel_shuffle_equals_transformers(rows, cols, scale):
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from connectors.pixel_shuffle import pixel_shuffle

    torch.manual_seed(0)
    x = torch.randn(3, rows, cols, 5)
    theirs = InternVLModel.pixel_shuffle(None, x, scale_factor=scale)  # `self` is not used
    assert torch.equal(pixel_shuffle(x, round(1 / scale)), theirs)


def test_pixel_shuffle_connector_equals_internvl_projector():
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

    cfg = InternVLConfig(vision_config=dict(hidden_size=6, intermediate_size=12, num_hidden_layers=1,
                                            num_attention_heads=2),
                         text_config=dict(model_type="qwen2", hidden_size=10, intermediate_size=20,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
                         downsample_ratio=0.5)
    torch.manual_seed(0)
    theirs = InternVLMultiModalProjector(cfg).eval()
    for p in theirs.parameters():  # LayerNorm weights away from 1 / 0 too
        torch.nn.init.normal_(p)
    ours = CONNECTORS.get("pixel_shuffle")(6, 10).eval()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    t = torch.linspace(-4, 4, 17)
    assert torch.equal(ours.act(t), theirs.act(t))  # both the exact (erf) GELU
    ours.load_state_dict(theirs.state_dict())
    feats = torch.randn(2, 36, 6)  # a 6x6 grid -> 9 tokens
    with torch.no_grad():
        ref = theirs(InternVLModel.pixel_shuffle(None, feats.reshape(2, 6, 6, 6), 0.5).reshape(2, -1, 24))
        out = ours(feats, (6, 6))
    assert out.shape == (2, 9, 10)
    assert torch.equal(out, ref)


def test_pixel_shuffle_num_tokens_and_errors():
    cls = CONNECTORS.get("pixel_shuffle")
    assert cls.num_tokens((32, 32)) == 256  # InternViT at 448px: 256 tokens per tile
    assert cls.num_tokens((32, 32), scale=0.25) == 64 and cls.num_tokens((4, 6)) == 6
    assert cls(8, 4).layer_norm.normalized_shape == (32,) and cls(8, 4, scale=0.25).linear_1.in_features == 128
    with pytest.raises(ValueError, match=r"pixel_shuffle: scale 0.5 .* divisible by 2; the grid is 5x5"):
        cls.num_tokens((5, 5), scale=0.5)
    with pytest.raises(ValueError, match=r"pixel_shuffle: option scale must be 1/k .* got 0.3"):
        cls.num_tokens((6, 6), scale=0.3)
    with pytest.raises(ValueError, match=r"pixel_shuffle: option scale must be a number in \(0, 1\], got 2"):
        cls(8, 4, scale=2)
    conn = cls(2, 4)
    with pytest.raises(ValueError, match="the grid is 3x4"):
        conn(torch.randn(1, 12, 2), (3, 4))
    with pytest.raises(ValueError, match="15 patch features do not form the 4x4 grid"):
        conn(torch.randn(1, 15, 2), (4, 4))
    # through the one place that counts placeholders: the error comes when the model / processor is built
    with pytest.raises(ValueError, match="the grid is 5x5"):
        ImageTokenCounter.for_config((5, 5), ConnectorConfig("pixel_shuffle", {"scale": 0.5}))


# ---- qformer --------------------------------------------------------------------------------------
QF_SMALL = dict(num_queries=5, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)


def test_qformer_equals_blip2_image_features():
    """Copied weights: the connector on the vision encoder's output before its post_layernorm equals
    what Blip2ForConditionalGeneration computes up to (and including) its language projection."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=4),
                      qformer_config={k: v for k, v in QF_SMALL.items() if k != "num_queries"},
                      text_config=dict(model_type="llama", hidden_size=20, intermediate_size=40, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=50),
                      num_query_tokens=5)
    torch.manual_seed(0)
    blip = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        blip.query_tokens.normal_()  # transformers initialises them to zeros
        torch.nn.init.normal_(blip.vision_model.post_layernorm.weight)
        torch.nn.init.normal_(blip.vision_model.post_layernorm.bias)
    ours = CONNECTORS.get("qformer")(24, 20, **QF_SMALL).eval()
    assert [layer.has_cross_attention for layer in ours.qformer.encoder.layer] == [True, False, True]
    ours.query_tokens.data.copy_(blip.query_tokens.data)
    ours.layernorm.load_state_dict(blip.vision_model.post_layernorm.state_dict())
    ours.qformer.load_state_dict(blip.qformer.state_dict())  # strict: the same Blip2QFormerModel
    ours.language_projection.load_state_dict(blip.language_projection.state_dict())

    pre_norm = []  # the hook returns None: it only records the input of post_layernorm
    blip.vision_model.post_layernorm.register_forward_hook(lambda m, args, out: pre_norm.append(args[0]))
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = blip.get_image_features(px).pooler_output  # [2, 5, 20]
        out = ours(pre_norm[0], None)  # all 17 tokens (CLS too), as BLIP-2 feeds them
    assert pre_norm[0].shape == (2, 17, 24)
    assert ref.shape == out.shape == (2, 5, 20)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_qformer_defaults_are_blip2():
    with torch.device("meta"):  # BERT-base sized: structure only, no memory
        m = CONNECTORS.get("qformer")(1408, 4096)
    c = m.qformer.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert c.encoder_hidden_size == 1408 and m.query_tokens.shape == (1, 32, 768)
    assert [layer.has_cross_attention for layer in m.qformer.encoder.layer] == [k % 2 == 0 for k in range(12)]
    assert m.layernorm.normalized_shape == (1408,) and m.language_projection.weight.shape == (4096, 768)
    assert CONNECTORS.get("qformer").num_tokens((24, 24)) == 32


def test_qformer_shape_tokens_init_and_training():
    cls = CONNECTORS.get("qformer")
    torch.manual_seed(0)
    m = cls(12, 20, **dict(QF_SMALL, num_queries=400))
    q = m.query_tokens.detach()
    assert abs(q.mean().item()) < 2e-3 and abs(q.std().item() - 0.02) < 1e-3  # N(0, 0.02)
    m = cls(12, 20, **QF_SMALL)
    for grid in [(4, 4), (3, 5)]:
        assert cls.num_tokens(grid, **QF_SMALL) == 5
        assert m(torch.randn(2, grid[0] * grid[1], 12), grid).shape == (2, 5, 20)
    feats = torch.randn(2, 16, 12, requires_grad=True)
    m(feats, (4, 4)).square().mean().backward()
    assert m.query_tokens.grad is not None and m.query_tokens.grad.abs().sum() > 0
    assert feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())  # no parameter a step (or a ZeRO rank) skips
    with pytest.raises(ValueError, match="qformer: option num_queries must be a positive integer, got 0"):
        cls.num_tokens((4, 4), num_queries=0)
    with pytest.raises(ValueError, match="qformer: option num_attention_heads 3 must divide hidden_size 16"):
        cls(12, 20, **dict(QF_SMALL, num_attention_heads=3))
    with pytest.raises(ValueError, match="qformer: option dropout must be a number in \\[0, 1\\), got 1.5"):
        cls(12, 20, **dict(QF_SMALL, dropout=1.5))
    with pytest.raises(ValueError, match="qformer: option num_hidden_layers must be a positive integer, got 0"):
        cls(12, 20, **dict(QF_SMALL, num_hidden_layers=0))


# ---- avgpool_mlp ----------------------------------------------------------------------------------
def test_avgpool_values_by_hand():
    from connectors.pool import avg_pool_grid

    x = torch.arange(9.0).reshape(1, 3, 3, 1)  # [[0 1 2] [3 4 5] [6 7 8]]
    out = avg_pool_grid(x, 2)[0, ..., 0]
    assert torch.equal(out, torch.tensor([[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]]))
    x = torch.arange(32.0).reshape(1, 4, 4, 2)  # divisible: plain 2x2 means, per channel
    out = avg_pool_grid(x, 2)[0]
    assert torch.equal(out[0, 0], torch.tensor([(0 + 2 + 8 + 10) / 4, (1 + 3 + 9 + 11) / 4]))
    assert torch.equal(out[1, 1], torch.tensor([(20 + 22 + 28 + 30) / 4, (21 + 23 + 29 + 31) / 4]))
    # the same as torch's ceil-mode pooling, on a random tensor with both sides ragged
    x = torch.randn(2, 5, 7, 3)
    ref = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, 3, ceil_mode=True, count_include_pad=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(avg_pool_grid(x, 3), ref)


def test_avgpool_mlp_connector():
    cls = CONNECTORS.get("avgpool_mlp")
    assert cls.num_tokens((24, 24)) == 144 and cls.num_tokens((5, 7), kernel=3) == 6
    assert cls.num_tokens((3, 3), kernel=1) == 9
    torch.manual_seed(0)
    m = cls(4, 6, kernel=2)
    feats = torch.randn(2, 15, 4)  # a 3x5 grid -> 2x3 tokens
    out = m(feats, (3, 5))
    assert out.shape == (2, 6, 6)
    pooled = feats.reshape(2, 3, 5, 4)[:, 0:2, 4:5].mean((1, 2))  # token (0, 2): the cut-short window
    ref = m.linear_2(F.gelu(m.linear_1(pooled)))
    torch.testing.assert_close(out[:, 2], ref)
    with pytest.raises(ValueError, match="avgpool_mlp: option kernel must be a positive integer, got 0"):
        cls.num_tokens((4, 4), kernel=0)
    with pytest.raises(ValueError, match="avgpool_mlp: 16 patch features do not form the 3x5 grid"):
        m(torch.randn(1, 16, 4), (3, 5))


# ---- perceiver_resampler --------------------------------------------------------------------------
def reference_resampler(m, feats):
    """Flamingo's resampler in plain torch ops, reading the module's weights."""
    ln = lambda t, norm: F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # noqa: E731
    x = feats if isinstance(m.proj_in, torch.nn.Identity) else feats @ m.proj_in.weight.T + m.proj_in.bias
    n, d = x.shape[0], x.shape[-1]
    lat = m.latents[None].repeat(n, 1, 1)
    for layer in m.layers:
        h = layer.heads
        ll = ln(lat, layer.norm_latents)
        kv_in = torch.cat([ln(x, layer.norm_media), ll], 1)
        wk, wv = layer.to_kv.weight.chunk(2)
        heads = lambda t: t.reshape(n, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
        q, k, v = heads(ll @ layer.to_q.weight.T), heads(kv_in @ wk.T), heads(kv_in @ wv.T)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1)
        lat = lat + (att @ v).transpose(1, 2).reshape(n, -1, d) @ layer.to_out.weight.T
        f = ln(lat, layer.ff[0]) @ layer.ff[1].weight.T
        lat = lat + F.gelu(f) @ layer.ff[3].weight.T
    return ln(lat, m.norm) @ m.proj_out.weight.T + m.proj_out.bias


@pytest.mark.parametrize("options", [dict(num_latents=6, depth=2, heads=2),
                                     dict(num_latents=3, depth=1, dim=16, heads=4)])
def test_resampler_equals_reference(options):
    torch.manual_seed(0)
    m = CONNECTORS.get("perceiver_resampler")(12, 20, **options)
    for p in m.parameters():  # LayerNorms away from 1 / 0 so the reference must use them right
        if p.dim() == 1:
            torch.nn.init.normal_(p)
    feats = torch.randn(2, 9, 12)
    out = m(feats, (3, 3))
    assert out.shape == (2, options["num_latents"], 20)
    with torch.no_grad():
        torch.testing.assert_close(out, reference_resampler(m, feats), rtol=1e-5, atol=1e-5)


def test_resampler_tokens_gradients_and_errors():
    cls = CONNECTORS.get("perceiver_resampler")
    assert cls.num_tokens((24, 24)) == 64 and cls.num_tokens((3, 7), num_latents=5, depth=1) == 5
    torch.manual_seed(0)
    m = cls(12, 20, num_latents=4, depth=2, heads=3)
    assert isinstance(m.proj_in, torch.nn.Identity) and len(m.layers) == 2
    assert m(torch.randn(1, 35, 12), (5, 7)).shape == (1, 4, 20)
    feats = torch.randn(2, 16, 12, requires_grad=True)
    m(feats, (4, 4)).square().mean().backward()
    assert feats.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="perceiver_resampler: option heads 5 must divide the resampler width dim 12"):
        cls(12, 20, heads=5)
    with pytest.raises(ValueError, match="perceiver_resampler: option num_latents must be a positive integer"):
        cls.num_tokens((4, 4), num_latents=-1)


# ---- each connector inside a tiny VLM -------------------------------------------------------------
VLM_CASES = {
    "pixel_shuffle": {},  # 4x4 grid -> 4 tokens
    "qformer": dict(num_queries=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, dropout=0.0),
    "avgpool_mlp": {"kernel": 3},  # 4x4 grid -> ceil(4/3)^2 = 4 tokens
    "perceiver_resampler": dict(num_latents=5, depth=1, dim=16, heads=2),
}
VLM_TOKENS = {"pixel_shuffle": 4, "qformer": 3, "avgpool_mlp": 4, "perceiver_resampler": 5}


@pytest.mark.parametrize("name", list(VLM_CASES))
def test_vlm_trains_and_roundtrips_with_connector(name, encoder_dirs, llm_dir, tmp_path):
    cfg = model_config(encoder_dirs["clip"], llm_dir)
    cfg.connector = ConnectorConfig(name, dict(VLM_CASES[name]))
    torch.manual_seed(0)
    model = VLM.from_config(cfg)
    proc = model.processor()
    convs = [[{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}],
             [{"from": "human", "value": "<image>\n<image>\nHow many shapes are there?"},
              {"from": "gpt", "value": "two"}]]
    imgs = [[Image.new("RGB", (16, 16), (220, 40, 40))], [Image.new("RGB", (12, 16), (40, 170, 60))] * 2]
    b = collate([proc(c, i) for c, i in zip(convs, imgs)], proc.tokenizer.pad_token_id)
    n_tokens = VLM_TOKENS[name]
    assert model.encoder.grid == (4, 4) and model.count_image_tokens.tokens_per_tile == n_tokens
    with torch.no_grad():
        feats = model.encode_images(b["pixel_values"])
    assert feats.shape == (3, n_tokens, model.llm.config.hidden_size)
    assert int((b["input_ids"] == model.image_token_id).sum()) == 3 * n_tokens  # placeholders == merged features

    apply_stage(model, {"connector": "full"})
    model.eval()  # deterministic (no dropout anywhere); gradients still flow
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model(**b)
    before.backward()
    for pname, p in model.connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    opt.step()
    with torch.no_grad():
        after = model(**b)
    assert after < before

    model.save_pretrained(tmp_path / "m")
    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.connector == cfg.connector and type(loaded.connector) is type(model.connector)
    with torch.no_grad():
        ref = model.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
        assert torch.equal(loaded.logits(b["input_ids"], b["attention_mask"], b["pixel_values"]), ref)
