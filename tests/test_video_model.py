"""Video on the model side: model.video, the token count, the processor's `<video>`, collate, the merge, pooling
values, newlines, the no-video path in training, packing, staging, save / load and generate."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ENCODER_CASES, LLM_KW
from vlmkit import VLM
from vlmkit.config import (ConfigError, ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, VideoConfig,
                           from_dict)
from vlmkit.data import collate
from vlmkit.data.conversation import IGNORE, SampleError
from vlmkit.data.processor import collate_packed

CONNECTORS = {"mlp": ("mlp2x_gelu", {}), "shuffle": ("pixel_shuffle", {"scale": 0.5}),
              "avgpool": ("avgpool_mlp", {"kernel": 2}), "qformer": ("qformer", {"num_queries": 5, "hidden_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 32, "dropout": 0.0})}


def video_config(tok_dir, side=16, connector="mlp", tiling=None, **video) -> ModelConfig:
    """A tiny random CLIP (patch 4: a side/4 x side/4 grid) + connector + tiny Llama, with model.video."""
    vision = dict(ENCODER_CASES["clip"][1], image_size=side)
    name, options = CONNECTORS[connector]
    return ModelConfig(encoder=EncoderConfig(name="clip", config=vision), connector=ConnectorConfig(name, options),
                       llm=LLMConfig(config=dict(LLM_KW), tokenizer=tok_dir), video=VideoConfig(**video),
                       **({"tiling": tiling} if tiling else {}))


def frames(n, size=(20, 14), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.new("RGB", size, tuple(torch.randint(0, 255, (3,), generator=g).tolist())) for _ in range(n)]


def conv(text="<video>\nWhat color is the shape?", answer="red"):
    return [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]


_MODELS: dict = {}


def cached(tok_dir, **kw) -> VLM:
    key = tuple(sorted(kw.items()))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = VLM.from_config(video_config(tok_dir, **kw)).eval()
    return _MODELS[key]


# ---- config ---------------------------------------------------------------------------------------
def test_video_config_checks_each_key(tok_dir):
    assert video_config(tok_dir).video == VideoConfig("<video>", "bilinear", 2, "video")
    for bad, msg in [({"pool": "mean"}, "video.pool must be one of none, average, max, bilinear, got 'mean'"),
                     ({"pool_stride": 0}, "video.pool_stride must be an integer >= 1, got 0"),
                     ({"newline": "row"}, "video.newline must be one of none, frame, video, got 'row'"),
                     ({"token": ""}, "video.token must be a non-empty string")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            VideoConfig(**bad)
    with pytest.raises(ConfigError, match=r"video: unknown keys \['frames'\]"):
        from_dict(ModelConfig, {"encoder": {"config": {}}, "llm": {"config": {}, "tokenizer": "t"},
                                "video": {"frames": 8}})
    with pytest.raises(ConfigError, match="is llm.image_token too"):
        video_config(tok_dir, token="<image>")


# ---- token count: exact values --------------------------------------------------------------------
@pytest.mark.parametrize("connector,side,video,n,expected", [
    ("mlp", 16, dict(pool="bilinear", newline="video"), 3, 2 * 2 * 3 + 1),  # 4x4 -> 2x2 per frame, one newline
    ("mlp", 20, dict(pool="bilinear", newline="frame"), 2, (3 * 3 + 1) * 2),  # 5x5 -> ceil 3x3, one per frame
    ("mlp", 20, dict(pool="average", newline="none"), 4, 2 * 2 * 4),  # 5x5 -> floor 2x2 before the connector
    ("mlp", 24, dict(pool="max", pool_stride=3, newline="video"), 1, 2 * 2 + 1),
    ("mlp", 16, dict(pool="none", newline="none"), 5, 16 * 5),
    ("shuffle", 16, dict(pool="bilinear", newline="none"), 2, 1 * 2),  # 4x4 -> shuffle 2x2 -> 1x1
    ("shuffle", 32, dict(pool="average", newline="video"), 2, 2 * 2 * 2 + 1),  # 8x8 -> pool 4x4 -> shuffle 2x2
    ("avgpool", 24, dict(pool="bilinear", newline="frame"), 3, (2 * 2 + 1) * 3),  # 6x6 -> 3x3 -> 2x2
    ("qformer", 16, dict(pool="average", newline="video"), 2, 5 * 2 + 1),  # queries, whatever the grid
])
def test_count_video_tokens_exact(tok_dir, connector, side, video, n, expected):
    model = cached(tok_dir, connector=connector, side=side, **video)
    assert model.count_image_tokens.count_video_tokens(n) == expected
    px = torch.randn(n, 3, side, side)
    assert [f.shape[0] for f in model.video_features(px, [n])] == [expected]


def test_bilinear_needs_a_connector_that_keeps_a_grid(tok_dir):
    with pytest.raises(ValueError, match="connector 'qformer' keeps no grid: use pool none, average or max"):
        VLM.from_config(video_config(tok_dir, connector="qformer", pool="bilinear"))
    with pytest.raises(ValueError, match="pool_stride 5 is larger than the encoder's 4x4 patch grid"):
        VLM.from_config(video_config(tok_dir, pool="average", pool_stride=5))
    with pytest.raises(ValueError, match="at least one frame"):
        cached(tok_dir).count_image_tokens.count_video_tokens(0)


# ---- pooling and newline values -------------------------------------------------------------------
def test_average_pools_patches_before_the_connector(tok_dir):
    model = cached(tok_dir, pool="average", newline="none")
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.encoder(px).reshape(2, 4, 4, -1)  # [N, R, C, ch]
        by_hand = torch.stack([feats[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
        want = model.connector(by_hand, (2, 2))  # [N, 4, D]
        got = model.video_features(px, [2])[0]
    torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]), atol=1e-6, rtol=1e-5)


def test_max_pools_patches_before_the_connector(tok_dir):
    model = cached(tok_dir, pool="max", newline="none")
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        feats = model.encoder(px).reshape(1, 4, 4, -1)
        by_hand = torch.stack([feats[:, r:r + 2, c:c + 2].amax((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
        torch.testing.assert_close(model.video_features(px, [1])[0], model.connector(by_hand, (2, 2))[0])


def test_bilinear_on_an_even_grid_is_the_mean_of_each_block_then_newline_after_the_video(tok_dir):
    """Bilinear to half size with align_corners false samples the midpoint of each 2x2 block: its mean."""
    model = cached(tok_dir, pool="bilinear", newline="video")
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tok = model.encode_images(px).reshape(3, 4, 4, -1)  # connector first
        want = torch.stack([tok[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
        got = model.video_features(px, [2, 1])
    assert [g.shape[0] for g in got] == [2 * 4 + 1, 4 + 1]
    torch.testing.assert_close(got[0][:8], want[:2].reshape(8, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1][:4], want[2], atol=1e-6, rtol=1e-5)
    assert torch.equal(got[0][8], model.video_newline) and torch.equal(got[1][4], model.video_newline)


def test_frame_newline_follows_every_frame(tok_dir):
    model = cached(tok_dir, pool="none", newline="frame")
    with torch.no_grad():
        got = model.video_features(torch.randn(3, 3, 16, 16), [3])[0]  # [3 * 17, D]
    assert got.shape[0] == 3 * 17
    for f in range(3):
        assert torch.equal(got[17 * f + 16], model.video_newline)


def test_anyres_model_shares_image_newline(tok_dir):
    """LLaVA-NeXT / OneVision: a model with image_newline uses it for videos too (no video_newline part)."""
    torch.manual_seed(0)
    model = VLM.from_config(video_config(tok_dir, tiling={"mode": "anyres"})).eval()
    assert model.video_newline is None and "video_newline" not in model.components()
    with torch.no_grad():
        got = model.video_features(torch.randn(2, 3, 16, 16), [2])[0]
    assert torch.equal(got[-1], model.image_newline)


# ---- the property: placeholders always equal merged features --------------------------------------
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(connector=st.sampled_from(sorted(CONNECTORS)), side=st.sampled_from([16, 20, 24, 32]),
       pool=st.sampled_from(["none", "average", "max", "bilinear"]), stride=st.integers(1, 3),
       newline=st.sampled_from(["none", "frame", "video"]),
       videos=st.lists(st.tuples(st.integers(1, 4), st.integers(4, 40), st.integers(4, 40)), min_size=0, max_size=3),
       with_image=st.booleans())
def test_placeholders_always_equal_merged_features(tok_dir, connector, side, pool, stride, newline, videos,
                                                   with_image):
    try:
        model = cached(tok_dir, connector=connector, side=side, pool=pool, pool_stride=stride, newline=newline)
    except ValueError:  # a pooling or connector that cannot take this grid: refused at build, said above
        assume(False)
    proc = model.processor()
    vids = [frames(n, (w, h), seed=k) for k, (n, w, h) in enumerate(videos)]
    text = "<image>\n" * with_image + "".join("<video>\n" for _ in vids) + "What color is the shape?"
    images = [Image.new("RGB", (12, 9), (9, 9, 9))] * with_image
    s = proc(conv(text), images, videos=vids)
    other = proc(conv("<video>\nHow many shapes are there?"), [], videos=[frames(1)])
    b = collate([s, other], proc.tokenizer.pad_token_id)
    placeholders = (b["input_ids"] == model.video_token_id).sum(1).tolist()
    counts = [model.count_image_tokens.count_video_tokens(n) for n, _, _ in videos]
    assert placeholders == [sum(counts), model.count_image_tokens.count_video_tokens(1)]
    with torch.no_grad():
        feats = model.video_features(b["pixel_values_videos"], b["frames_per_video"])
        embeds = model.embed(b["input_ids"], b["pixel_values"], b.get("image_sizes"), b.get("images_per_sample"),
                             b.get("tiles_per_image"), None, b["pixel_values_videos"], b["frames_per_video"],
                             b["videos_per_sample"])
    assert [f.shape[0] for f in feats] == counts + [placeholders[1]]
    mask = b["input_ids"] == model.video_token_id
    assert torch.equal(embeds[mask], torch.cat(feats))


# ---- processor and collate ------------------------------------------------------------------------
def test_processor_expands_video_and_collates(tok_dir):
    model = cached(tok_dir)
    proc = model.processor()
    s = proc(conv("<video>\n<image>\nWhat color is the shape?"), [Image.new("RGB", (8, 8))],
             videos=[frames(3)])
    assert s["pixel_values_videos"].shape == (3, 3, 16, 16) and s["frames_per_video"].tolist() == [3]
    ids, labels = s["input_ids"], s["labels"]
    at = (ids == model.video_token_id).nonzero()[:, 0]
    assert len(at) == 13 and (at.diff() == 1).all() and (labels[at] == IGNORE).all()
    assert torch.equal(s["pixel_values_videos"][1], proc.transform(frames(3)[1]))

    class Video:  # what vlmkit.data.video passes: an object with a .frames list
        def __init__(self, fs):
            self.frames = fs
    assert torch.equal(proc(conv(), [], videos=[Video(frames(3))])["input_ids"],
                       proc(conv(), [], videos=[frames(3)])["input_ids"])
    none = proc(conv("What color is the shape?"), [])
    assert none["pixel_values_videos"].shape == (0, 3, 16, 16) and none["frames_per_video"].shape == (0,)
    two = proc(conv("<video> <video> What color is the shape?"), [], videos=[frames(1), frames(2)])
    b = collate([none, s, two], 0)
    assert b["pixel_values_videos"].shape[0] == 6 and b["frames_per_video"].tolist() == [3, 1, 2]
    assert b["videos_per_sample"].tolist() == [0, 1, 2]
    packed = collate_packed([none, s, two], 0, max_tokens=100)
    assert torch.equal(packed["pixel_values_videos"], b["pixel_values_videos"])
    assert packed["videos_per_sample"].tolist() == [0, 1, 2]


def test_processor_errors_name_the_video_problem(tok_dir, vlm):
    proc = cached(tok_dir).processor()
    with pytest.raises(SampleError, match="1 <video> placeholder\\(s\\) in the text but 2 video\\(s\\)") as e:
        proc(conv(), [], videos=[frames(1), frames(1)])
    assert e.value.kind == "video_count_mismatch"
    with pytest.raises(SampleError, match="0 <video> placeholder\\(s\\) in the text but 1 video"):
        proc(conv("What color?"), [], videos=[frames(1)])
    with pytest.raises(SampleError, match="a <video> in an assistant turn"):
        proc(conv("What?", "<video>"), [], videos=[frames(1)])
    with pytest.raises(SampleError, match="a video with no frames"):
        proc(conv(), [], videos=[[]])
    with pytest.raises(SampleError, match="too long to keep its video"):
        proc(conv("What color is the shape? What color is the shape? <video>"), [], videos=[frames(4)],
             max_length=12)
    with pytest.raises(SampleError, match="this model takes no video \\(model.video is not set\\)"):
        vlm.processor()(conv(), [], videos=[frames(1)])


# ---- merge checks, training, packing ---------------------------------------------------------------
def test_merge_counts_are_checked_like_images(tok_dir, vlm):
    model = cached(tok_dir)
    proc = model.processor()
    b = collate([proc(conv(), [], videos=[frames(2)])], 0)
    with pytest.raises(ValueError, match=r"video token mismatch: 1 video\(s\) give 13 features \(expected 13\), "
                                         r"the text holds 9 placeholder tokens"):
        model.embed(b["input_ids"], None, pixel_values_videos=torch.randn(3, 3, 16, 16), frames_per_video=[3])
    with pytest.raises(ValueError, match=r"frames_per_video \[1\] \(each >= 1\) must add up to the 2 frame"):
        model.embed(b["input_ids"], None, pixel_values_videos=b["pixel_values_videos"], frames_per_video=[1])
    with pytest.raises(ValueError, match="video token mismatch in sample 0"):
        model.embed(b["input_ids"], None, pixel_values_videos=b["pixel_values_videos"],
                    frames_per_video=b["frames_per_video"], videos_per_sample=[0])
    with pytest.raises(ValueError, match=r"this model takes no video \(model.video is not set\), but the batch "
                                         r"holds 2 video frame"):
        vlm.embed(b["input_ids"], None, pixel_values_videos=b["pixel_values_videos"], frames_per_video=[2])


def test_batch_without_video_still_runs_the_video_path_in_training(tok_dir):
    """DDP / ZeRO-3: a rank with no video still runs encoder, pooling, connector and video_newline (times 0)."""
    torch.manual_seed(0)
    model = VLM.from_config(video_config(tok_dir, pool="average", newline="frame"))
    proc = model.processor()
    b = collate([proc(conv("<image>\nWhat color is the shape?"), [Image.new("RGB", (8, 8))])], 0)
    model.eval()
    with torch.no_grad():
        ref = model(**b)
    model.train()
    model.requires_grad_(False)
    model.video_newline.requires_grad_(True)
    loss = model(**b)
    loss.backward()
    assert torch.equal(loss.detach(), ref)
    assert model.video_newline.grad is not None and torch.equal(model.video_newline.grad,
                                                                torch.zeros_like(model.video_newline))


def test_packed_video_batch_gives_the_padded_loss(tok_dir):
    model = cached(tok_dir, pool="bilinear", newline="frame")
    proc = model.processor()
    ss = [proc(conv(), [], videos=[frames(2)]), proc(conv("<image> What color?"), [Image.new("RGB", (8, 8))]),
          proc(conv("<video> <image> <video> How many shapes are there?"), [Image.new("RGB", (9, 8))],
               videos=[frames(1, seed=3), frames(3, seed=4)])]
    with torch.no_grad():
        padded = model(**collate(ss, 0))
        packed = model(**collate(ss, 0, pack=True))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_video_newline_is_a_stage_component_and_saves(tok_dir, tmp_path):
    from vlmkit.models.build import load_processor
    from vlmkit.stages import apply_stage

    torch.manual_seed(0)
    model = VLM.from_config(video_config(tok_dir, newline="frame"))
    assert set(model.components()) == {"encoder", "connector", "llm", "video_newline"}
    apply_stage(model, {"video_newline": "full"})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["video_newline"]
    model.save_pretrained(tmp_path / "m")
    back = VLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(back.video_newline, model.video_newline) and back.video_token_id == model.video_token_id
    proc = load_processor(tmp_path / "m")
    s = proc(conv(), [], videos=[frames(2)])
    assert (s["input_ids"] == back.video_token_id).sum() == back.count_image_tokens.count_video_tokens(2) == 10
    b = collate([proc(conv("<video>\nWhat color is the shape?")[:1], [], videos=[frames(2)],
                      add_generation_prompt=True)], 0)
    out = back.generate(b["input_ids"], None, None, max_new_tokens=3, pixel_values_videos=b["pixel_values_videos"],
                        frames_per_video=b["frames_per_video"])
    assert out.shape == (1, 3)


def test_lora_on_the_llm_with_video(tok_dir):
    from vlmkit.config import ComponentPlan

    torch.manual_seed(0)
    model = VLM.from_config(video_config(tok_dir))
    proc = model.processor()
    b = collate([proc(conv(), [], videos=[frames(2)])], 0)
    model.add_lora("llm", ComponentPlan(mode="lora", r=4, alpha=8))
    model.train()
    model(**b).backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert math.isfinite(float(model(**b).detach()))


def test_plain_template_keeps_the_video_placeholder(tok_dir):
    """Video caption pre-training (`template: plain`, LLaVA's stage 1): the `<video>` of the human turn stays, and
    expands to the counter's number of placeholders; the caption is trained (it was dropped with the question
    text: every video caption sample was a video_count_mismatch)."""
    model = cached(tok_dir)
    proc = model.processor()
    out = proc(conv("<video>\nDescribe the video.", "red"), [], "plain", videos=[frames(3)])
    vid = model.video_token_id
    n = model.count_image_tokens.count_video_tokens(3)
    ids = out["input_ids"].tolist()
    assert ids.count(vid) == n and ids[1:1 + n] == [vid] * n
    assert (out["labels"] != -100).sum() > 0 and out["frames_per_video"].tolist() == [3]
