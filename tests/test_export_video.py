"""Export of a video model to transformers' LlavaNextVideoForConditionalGeneration: logits parity on a video, on an
image and on both in one prompt, generation parity in a process where vlmkit cannot be imported, the chat template
with `{"type": "video"}` content, the processor files, and every setting that does not map refused by name.

transformers' video processors need torchvision (not installed here): the exported model is fed the
pixel_values_videos vlmkit's processor makes; the video processor's settings are written as JSON and only checked
as files (a machine with torchvision loads them with AutoProcessor)."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_for_export, model_config
from vlmkit.config import TilingConfig, VideoConfig
from vlmkit.data import collate
from vlmkit.data.conversation import get_template, normalize, render
from vlmkit.export import export_model, export_target


def exportable_video_config(encoder_dir, llm_dir, **video):
    """The tiny video model whose parts export exactly (LlavaNextVideo): CLIP + mlp2x_gelu, AnyRes with unpad for
    images, frames stretched to the square (image_aspect resize), average 2x2 pooling before the connector, no
    video newline."""
    cfg = model_config(encoder_dir, llm_dir)
    cfg.encoder.image_aspect = "resize"
    cfg.tiling = TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)")
    cfg.video = VideoConfig(**{"pool": "average", "pool_stride": 2, "newline": "none", **video})
    return cfg


def image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def clip(n, seed=0):
    return [image(24, 18, seed + k) for k in range(n)]


@pytest.fixture(scope="module", params=["average", "max"])
def exported(request, tmp_path_factory, encoder_dirs, llm_dir):
    model = build_for_export(exportable_video_config(encoder_dirs["clip"], llm_dir, pool=request.param))
    assert export_target(model) == "llava_next_video"
    return model, export_model(model, tmp_path_factory.mktemp(f"video_{request.param}"))


def hf_inputs(model, text, images, videos):
    """vlmkit's ids and pixels in the exported model's layout (videos [1, F, 3, T, T]; images LlavaNext's)."""
    from transformers import LlavaNextImageProcessorPil

    p = model.processor()([{"from": "human", "value": text}], images, videos=videos, add_generation_prompt=True)
    kw = {"input_ids": p["input_ids"][None]}
    if videos:
        kw["pixel_values_videos"] = p["pixel_values_videos"][None]
    if images:
        ip = LlavaNextImageProcessorPil(**_image_processor_settings(model))
        enc = ip(images, return_tensors="pt")
        kw.update(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
    return p, kw


def _image_processor_settings(model):
    from vlmkit.export import llava_next_image_processor

    return llava_next_image_processor(model).to_dict()


@pytest.mark.parametrize("what", ["video", "image", "both"])
def test_logits_match_the_exported_model(exported, what):
    from transformers import AutoModelForImageTextToText, LlavaNextVideoForConditionalGeneration

    model, out = exported
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(hf, LlavaNextVideoForConditionalGeneration)
    images = [image(41, 23)] if what != "video" else []
    videos = [clip(3)] if what != "image" else []
    text = "<image>\n" * len(images) + "<video>\n" * len(videos) + "What color is the shape?"
    p, kw = hf_inputs(model, text, images, videos)
    b = collate([p], model.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = model.logits(**b)
        got = hf(**kw).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_folder_holds_the_video_settings(exported):
    model, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_next_video" and cfg["video_token_index"] == model.video_token_id
    assert cfg["spatial_pool_mode"] == model.config.video.pool and cfg["spatial_pool_stride"] == 2
    assert cfg["video_seq_length"] == model.count_image_tokens.count_video_tokens(1) == 4
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaNextVideoProcessor" and proc["video_token"] == "<video>"
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video == proc["video_processor"]
    assert video["size"] == {"height": 16, "width": 16} and video["do_center_crop"] is False
    assert video["image_mean"] == pytest.approx(list(model.encoder.mean))


SERVE = textwrap.dedent("""
    import sys

    class NoVlmkit:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "vlmkit":
                raise ImportError("vlmkit is not available to this process")

    sys.meta_path.insert(0, NoVlmkit())
    try:
        import vlmkit  # noqa: F401
        raise SystemExit("vlmkit was importable")
    except ImportError:
        pass

    import json
    from unittest import mock

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    job = json.load(open(sys.argv[1]))
    model = AutoModelForImageTextToText.from_pretrained(job["out"]).eval()
    check = ProcessorMixin.check_argument_for_proper_class
    # the video processor needs torchvision (absent here): the processor loads without that one part
    with mock.patch.object(AutoVideoProcessor, "from_pretrained", return_value=None), \\
            mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                              lambda self, name, arg: None if name == "video_processor" else check(self, name, arg)):
        proc = AutoProcessor.from_pretrained(job["out"], backend="pil")
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": job["question"]}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    inputs = torch.load(job["inputs"])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, n:]
    print(json.dumps({"text": text, "new": new.tolist(), "class": type(proc).__name__,
                      "vlmkit_loaded": any(m.split(".")[0] == "vlmkit" for m in sys.modules)}))
""")


def check_generates_without_vlmkit(model, out, p, kw, question, tmp_path, processor_class):
    """The exported folder in a `python -I` process where vlmkit cannot be imported (SERVE): its processor class,
    its chat template's text equal to vlmkit's rendering, and greedy generation on vlmkit's inputs `kw` equal to
    vlmkit's own tokens (from its processor output `p`)."""
    torch.save(kw, tmp_path / "inputs.pt")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"out": str(out), "question": question, "inputs": str(tmp_path / "inputs.pt")}))
    res = subprocess.run([sys.executable, "-I", "-c", SERVE, str(job)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["class"] == processor_class and not got["vlmkit_loaded"]
    messages = normalize([{"from": "human", "value": "<video>\n" + question}])
    want, _ = render(messages, model.tokenizer, get_template(model.config.template), add_generation_prompt=True)
    assert got["text"] == want
    with torch.no_grad():
        mine = model.generate(p["input_ids"][None], None, None, max_new_tokens=5,
                              pixel_values_videos=p["pixel_values_videos"], frames_per_video=p["frames_per_video"])
    assert got["new"] == mine[0].tolist()


def test_export_generates_without_vlmkit(exported, tmp_path):
    model, out = exported
    question = "What color is the shape?"
    p, kw = hf_inputs(model, "<video>\n" + question, [], [clip(2, seed=5)])
    check_generates_without_vlmkit(model, out, p, kw, question, tmp_path, "LlavaNextVideoProcessor")


@pytest.mark.parametrize("change,msg", [
    ({"video": {"pool": "average", "newline": "frame"}}, "cannot export video.newline 'frame' to LlavaNextVideo"),
    ({"video": {"pool": "max", "pool_stride": 3}}, "cannot export video.pool_stride 3 to LlavaNextVideo"),
    ({"video": {"pool": "none"}}, "cannot export video.pool 'none'"),
    ({"video": {"pool": "bilinear", "newline": "frame"}}, "cannot export video.newline 'frame' to LlavaOnevision"),
    ({"aspect": "pad"}, "cannot export video to LlavaNextVideo: vlmkit pads each frame"),
    ({"tiling": None}, "cannot export none tiling to LlavaNext.*LlavaNextVideo's images are LlavaNext's"),
    ({"tiling": {"unpad": False}}, "cannot export AnyRes with unpad: false"),
])
def test_settings_that_do_not_map_are_refused(change, msg, encoder_dirs, llm_dir, tmp_path):
    cfg = exportable_video_config(encoder_dirs["clip"], llm_dir)
    if "video" in change:
        cfg.video = VideoConfig(**change["video"])
    if "aspect" in change:
        cfg.encoder.image_aspect = change["aspect"]
    if "tiling" in change:
        cfg.tiling = (TilingConfig() if change["tiling"] is None else
                      TilingConfig(mode="anyres", grid_pinpoints="(1x1),...,(2x2)", **change["tiling"]))
    model = build_for_export(cfg)
    with pytest.raises(ValueError, match=msg):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
