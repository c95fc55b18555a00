"""Export of a video model with VideoConfig's defaults (bilinear pooling after the connector, one newline per
video) to transformers' LlavaOnevisionForConditionalGeneration: logits parity on a video, on images of several
aspect ratios (with and without anyres_max, the downscale really firing) and on both in one prompt; the exported
processor's placeholder counts equal vlmkit's; generation parity in a process where vlmkit cannot be imported;
every setting that does not map refused by name.

transformers' video processors need torchvision (not installed here): without it the processor is loaded with
the video processor left out (its counts come from processor_config.json); the test that runs videos through
the exported processor runs where torchvision is installed."""
import importlib.util
import json
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from conftest import build_for_export, model_config
from test_export_video import check_generates_without_vlmkit, clip, image
from vlmkit.config import ConnectorConfig, TilingConfig, VideoConfig
from vlmkit.data import collate
from vlmkit.data.conversation import normalize
from vlmkit.export import export_model, export_target
from vlmkit.tiling import anyres_feature_grid

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# (width, height): wide, tall, square, very wide; none is a canvas's aspect ratio, so unpad crops features
SIZES = [(41, 23), (23, 41), (30, 30), (60, 10)]


def onevision_config(encoder_dir, llm_dir, anyres_max=None, **video):
    """The tiny video model with LLaVA-OneVision's parts: CLIP + mlp2x_gelu, AnyRes (unpad; anyres_max if
    given), frames stretched to the square, VideoConfig's defaults (bilinear, stride 2, newline video)."""
    cfg = model_config(encoder_dir, llm_dir)
    cfg.encoder.image_aspect = "resize"
    cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)", anyres_max=anyres_max)
    cfg.video = VideoConfig(**video)
    return cfg


@pytest.fixture(scope="module", params=[None, 1], ids=["anyres", "anyres_max_1"])
def exported(request, tmp_path_factory, encoder_dirs, llm_dir):
    model = build_for_export(onevision_config(encoder_dirs["clip"], llm_dir, request.param))
    assert (model.config.video.pool, model.config.video.newline) == (VideoConfig().pool, VideoConfig().newline)
    assert export_target(model) == "llava_onevision"
    return model, export_model(model, tmp_path_factory.mktemp(f"onevision_{request.param}"))


@contextmanager
def video_processor_left_out():
    """Load a processor whose video processor needs torchvision where torchvision is missing: that one part
    is None, the rest (image processor, tokenizer, counts, chat template) is the folder's."""
    if HAS_TORCHVISION:
        yield
        return
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    with mock.patch.object(AutoVideoProcessor, "from_pretrained", return_value=None), \
            mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                              lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        yield


def load_processor(out):
    """The exported processor with its image processor on the PIL backend (vlmkit's resize; torchvision's bicubic
    differs by a few 1e-2 at tile edges). backend="pil" reaches the video processor too, which has no PIL
    backend where torchvision is installed: then the processor loads plainly and its image processor is swapped."""
    from transformers import AutoImageProcessor, AutoProcessor

    with video_processor_left_out():
        for kw in ({"backend": "pil"}, {}):
            try:
                proc = AutoProcessor.from_pretrained(out, **kw)
                break
            except (TypeError, ValueError, ImportError, AttributeError):  # 5.17: 'backend' has no setter
                continue
        else:
            raise AssertionError(f"no processor loads from {out}")
    proc.image_processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    return proc


def image_inputs(out, images):
    """The exported image processor's pixel_values / image_sizes (h, w) / batch_num_images of a flat list."""
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert type(ip).__name__ == "LlavaOnevisionImageProcessorPil"
    return dict(ip(images, return_tensors="pt"))


def hf_inputs(model, out, text, images, videos):
    """vlmkit's prompt ids and frames; the images through the exported image processor."""
    p = model.processor()([{"from": "human", "value": text}], images, videos=videos, add_generation_prompt=True)
    kw = {"input_ids": p["input_ids"][None]}
    if videos:  # [n_videos, F, 3, T, T]: transformers stacks videos, so those of one prompt share F
        kw["pixel_values_videos"] = torch.stack(p["pixel_values_videos"].split(p["frames_per_video"].tolist()))
    if images:
        kw.update(image_inputs(out, images))
    return p, kw


def assert_same_logits(model, hf, p, kw):
    b = collate([p], model.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model.logits(**b)
        got = hf(**kw).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("what", ["video", "image", "both"])
def test_logits_match_the_exported_model(exported, what):
    from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

    model, out = exported
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(hf, LlavaOnevisionForConditionalGeneration)
    q = "What color is the shape?"
    if what == "video":
        for n in (1, 3):
            assert_same_logits(model, hf, *hf_inputs(model, out, "<video>\n" + q, [], [clip(n, seed=n)]))
        return
    downscaled = 0
    for k, (w, h) in enumerate(SIZES):
        g = anyres_feature_grid((w, h), model.tiling.pinpoints, 16, 4, model.tiling.anyres_max)
        downscaled += (g["h"], g["w"]) != (g["unpad_h"], g["unpad_w"])
        images, videos = [image(w, h, seed=k)], [clip(2, seed=k)] if what == "both" else []
        text = "<image>\n" + "<video>\n" * len(videos) + q
        assert_same_logits(model, hf, *hf_inputs(model, out, text, images, videos))
    # anyres_max 1 shrinks the unpadded grid of the multi-tile canvases; without it nothing is downscaled
    assert (downscaled > 0) == (model.tiling.anyres_max is not None)
    if what == "both":  # two images (a flat list: each one tiled) and two videos in one prompt
        images, videos = [image(41, 23), image(60, 10, seed=1)], [clip(3), clip(3, seed=4)]
        text = "<image>\n<video>\nand <image> then <video>\n" + q
        assert_same_logits(model, hf, *hf_inputs(model, out, text, images, videos))


def test_processor_counts_match_vlmkit(exported):
    model, out = exported
    proc = load_processor(out)
    assert type(proc).__name__ == "LlavaOnevisionProcessor"
    counter, ref = model.count_image_tokens, model.processor()
    got = proc._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES],
                                          video_sizes=[(n, 16, 16) for n in (1, 2, 7)])
    assert got["num_image_tokens"] == [counter(w, h) for w, h in SIZES]
    assert [counter.count_video_tokens(n) for n in (1, 2, 7)] == [5, 9, 29]
    if getattr(got, "num_video_tokens", None) is not None:  # transformers 5.17 leaves videos out of this count (5.24 has them);
        assert got["num_video_tokens"] == [5, 9, 29]  # test_processor_runs_videos_like_vlmkit checks the ids anyway
    prompt = [{"from": "human", "value": "<image>\nWhat is it? <image>"}]
    for k, (w, h) in enumerate(SIZES):
        ims = [image(w, h, seed=k), image(*SIZES[k - 1], seed=9)]
        want = ref(prompt, ims, add_generation_prompt=True)
        text = proc.apply_chat_template(normalize(prompt), add_generation_prompt=True)
        enc = proc(text=text, images=ims, return_tensors="pt", add_special_tokens=False)
        assert enc["input_ids"][0].tolist() == want["input_ids"].tolist(), (w, h)
        tiles = torch.cat([px[:n] for px, n in zip(enc["pixel_values"], [1 + counter.tiling.grid(i.size)[0] *
                                                                         counter.tiling.grid(i.size)[1] for i in ims])])
        torch.testing.assert_close(tiles, want["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' video processors need torchvision")
def test_processor_runs_videos_like_vlmkit(exported):
    model, out = exported
    proc = load_processor(out)
    assert type(proc.video_processor).__name__.startswith("LlavaOnevisionVideoProcessor")
    prompt = [{"from": "human", "value": "<image>\n<video>\nWhat moves?"}]
    ims, frames = [image(41, 23)], clip(3, seed=2)
    want = model.processor()(prompt, ims, videos=[frames], add_generation_prompt=True)
    text = proc.apply_chat_template(normalize(prompt), add_generation_prompt=True)
    enc = proc(text=text, images=ims, videos=[frames], return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == want["input_ids"].tolist()
    assert enc["pixel_values_videos"].shape == (1, *want["pixel_values_videos"].shape)


def test_folder_holds_the_onevision_settings(exported):
    model, out = exported
    n = model.tiling.anyres_max or 4  # without anyres_max: the 2x2 canvas's 4 tiles, never downscaling
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision" and cfg["vision_aspect_ratio"] == f"anyres_max_{n}"
    assert cfg["video_token_index"] == model.video_token_id and cfg["image_token_index"] == model.image_token_id
    assert cfg["vision_feature_select_strategy"] == "default"
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaOnevisionProcessor" and proc["video_token"] == "<video>"
    assert proc["num_image_tokens"] == 17 and proc["vision_aspect_ratio"] == f"anyres_max_{n}"
    assert "patch_size" not in proc and proc["image_processor"]["image_processor_type"].startswith("LlavaOnevision")
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video == proc["video_processor"] and video["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert "LLaVA-OneVision" in (out / "README.md").read_text()


def test_export_generates_without_vlmkit(exported, tmp_path):
    model, out = exported
    question = "What color is the shape?"
    p, kw = hf_inputs(model, out, "<video>\n" + question, [], [clip(2, seed=5)])
    check_generates_without_vlmkit(model, out, p, kw, question, tmp_path, "LlavaOnevisionProcessor")


@pytest.mark.parametrize("change,msg", [
    ({"video": {"pool_stride": 3}}, "cannot export video.pool_stride 3 to LlavaOnevision"),
    ({"video": {"newline": "frame"}}, "cannot export video.newline 'frame' to LlavaOnevision"),
    ({"video": {"newline": "none"}}, "cannot export video.newline 'none' to LlavaOnevision"),
    ({"video": {"pool": "none"}}, "cannot export video.pool 'none' to LlavaOnevision"),
    ({"video": {"pool": "average"}}, "cannot export video.newline 'video' to LlavaNextVideo"),
    ({"aspect": "pad"}, "cannot export video to LlavaOnevision: vlmkit pads each frame"),
    ({"tiling": None}, "cannot export none tiling to LlavaOnevision"),
    ({"tiling": {"unpad": False}}, "cannot export AnyRes with unpad: false to LlavaOnevision"),
    ({"connector": ConnectorConfig("avgpool_mlp", {"kernel": 2})}, "cannot export connector 'avgpool_mlp' to "
                                                                   "LlavaOnevision"),
])
def test_settings_that_do_not_map_are_refused(change, msg, encoder_dirs, llm_dir, tmp_path):
    cfg = onevision_config(encoder_dirs["clip"], llm_dir, **change.get("video", {}))
    if "aspect" in change:
        cfg.encoder.image_aspect = change["aspect"]
    if "tiling" in change:
        cfg.tiling = (TilingConfig() if change["tiling"] is None else
                      TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)", **change["tiling"]))
    if "connector" in change:
        cfg.connector = change["connector"]
    model = build_for_export(cfg)
    with pytest.raises(ValueError, match=msg):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_picks_onevision(exported, tmp_path, capsys):
    """`vlmkit export` of a saved model with the default video settings writes LlavaOnevision."""
    from transformers import AutoModelForImageTextToText
    from vlmkit.cli import main

    model, _ = exported
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    assert "LlavaOnevisionForConditionalGeneration" in capsys.readouterr().out
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    p, kw = hf_inputs(model, tmp_path / "hf", "<image>\n<video>\nWhat moves?", [image(41, 23)], [clip(2)])
    assert_same_logits(model, hf, p, kw)
