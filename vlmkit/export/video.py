"""Video targets: a model with `model.video` exports to transformers' video-capable Llava classes.

    export_llava_next_video(model_or_dir, out_dir)   CLIP / SigLIP + mlp2x_gelu + AnyRes (unpad) images, video
        pool average | max with pool_stride 2 before the connector, no video newline
        -> LlavaNextVideoForConditionalGeneration (its vision_resampler pools the patch grid, then the projector)

LLaVA-OneVision (video.pool bilinear after the connector, one newline per video, anyres_max images: VideoConfig's
defaults) is onevision.py's, over `check_video_common` and `video_processor_dict` here. transformers' video
processors need torchvision, so the processor files are written as JSON (a machine with torchvision loads them
with AutoProcessor); the image processor and tokenizer load without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import prepare
from .llava import _baked_vision_config_and_state, _processor, check_llava_next_exportable, llava_next_config, \
    llava_next_image_processor, write_llava_family

NATIVE_CLASSES = {"llava_next_video": "LlavaNextVideoForConditionalGeneration"}


def check_video_common(model, target: str) -> None:
    """What every video target needs: model.video set, frames stretched to the square (the video processors
    resize, they do not pad), a square patch grid."""
    v = model.config.video
    if v is None:
        raise ValueError(f"cannot export to {target}: the model takes no video (model.video is not set)")
    if model.config.encoder.image_aspect != "resize":
        raise ValueError(f"cannot export video to {target}: vlmkit pads each frame to a square (encoder.image_aspect "
                         "pad) while transformers' video processors resize it; set encoder.image_aspect resize")
    rows, cols = model.encoder.grid
    if rows != cols:
        raise ValueError(f"cannot export video to {target}: its pooling assumes a square patch grid, the "
                         f"encoder's is {rows}x{cols}")


def check_llava_next_video_exportable(model) -> None:
    """Raise ValueError naming the setting when `model` has no exact LlavaNextVideoForConditionalGeneration
    equivalent."""
    check_video_common(model, "LlavaNextVideo")
    v = model.config.video
    if v.pool not in ("average", "max"):
        raise ValueError(f"cannot export video.pool {v.pool!r} to LlavaNextVideo: its vision_resampler pools the "
                         "patch grid before the projector (video.pool average or max); bilinear after the "
                         "connector is LLaVA-OneVision's")
    if v.pool_stride != 2:
        raise ValueError(f"cannot export video.pool_stride {v.pool_stride} to LlavaNextVideo: its processor counts "
                         "a quarter of the image tokens per frame (stride 2)")
    if model.encoder.grid[0] % 2:
        raise ValueError(f"cannot export video to LlavaNextVideo: its processor counts tokens // 4 per frame, which "
                         f"differs from pooling the odd {model.encoder.grid[0]}x{model.encoder.grid[1]} patch grid")
    if v.newline != "none":
        raise ValueError(f"cannot export video.newline {v.newline!r} to LlavaNextVideo: it appends no newline to "
                         "video tokens (use newline none)")
    try:
        check_llava_next_exportable(model)
    except ValueError as e:
        raise ValueError(f"{e} (LlavaNextVideo's images are LlavaNext's)") from None


def video_processor_dict(model, cls: str) -> dict:
    """The video processor's settings as transformers saves them: frames resized to the encoder's square input
    (bicubic), rescaled and normalised as vlmkit's ImageTransform does with image_aspect resize."""
    e = model.encoder
    return {"video_processor_type": cls, "do_resize": True, "size": {"height": e.image_size, "width": e.image_size},
            "default_to_square": True, "resample": 3, "do_center_crop": False, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(e.mean), "image_std": list(e.std),
            "do_convert_rgb": True, "do_sample_frames": False}


def llava_next_video_config(model):
    from transformers import LlavaNextVideoConfig

    next_cfg = llava_next_config(model)
    base = next_cfg.to_dict()
    v = model.config.video
    keep = ("image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
            "multimodal_projector_bias", "tie_word_embeddings", "image_seq_length")
    vision, _ = _baked_vision_config_and_state(model)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=next_cfg.text_config, image_token_index=model.image_token_id,
        video_token_index=model.video_token_id, spatial_pool_mode=v.pool, spatial_pool_stride=v.pool_stride,
        video_seq_length=model.count_image_tokens.count_video_tokens(1), **{k: base[k] for k in keep})
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def processor_writer(text_side, image_processor, video: dict, settings: dict, drop: tuple[str, ...] = ()):
    """`save(folder)`: the text-side processor (tokenizer, chat template) and `image_processor` saved, then
    processor_config.json given `settings` (processor_class, ...) and the video processor's settings nested, less
    the keys in `drop`, and video_preprocessor_config.json (the pre-v5 layout) written: the video processor
    itself is never instantiated (transformers' video processors need torchvision)."""
    def save(folder: Path) -> None:
        text_side.save_pretrained(str(folder))
        image_processor.save_pretrained(str(folder))
        path = folder / "processor_config.json"
        cfg = json.loads(path.read_text())
        for k in drop:
            cfg.pop(k, None)
        cfg.update(settings, video_processor=video)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    return save


def save_video_processor(model, template: str | None, processor_class: str, video_cls: str):
    """Processor files for LlavaNextVideo: a LlavaNext processor (image processor, tokenizer, chat template) saved,
    its processor_config.json made the video class's (`processor_writer`)."""
    from transformers import LlavaNextProcessor

    image_side = _processor(LlavaNextProcessor, llava_next_image_processor(model), model, template)
    return processor_writer(image_side, image_side.image_processor, video_processor_dict(model, video_cls),
                            {"processor_class": processor_class, "video_token": model.config.video.token})


def export_llava_next_video(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native LlavaNextVideo checkpoint (weights, config, processor files, model card)."""
    return write_llava_next_video(*prepare(model_or_dir), out_dir, template)


def write_llava_next_video(model, src, out_dir, template=None) -> Path:
    """`export_llava_next_video` of a model already prepared (`common.prepare`)."""
    from transformers import LlavaNextVideoForConditionalGeneration

    check_llava_next_video_exportable(model)
    cfg = llava_next_video_config(model)
    v = model.config.video
    notes = [f"- AnyRes images (LLaVA-NeXT): canvases {[list(p) for p in model.tiling.pinpoints]}, unpad, "
             "`image_newline` after each feature row",
             f"- video: each frame one {model.encoder.image_size}px tile, {v.pool} pooling {v.pool_stride}x"
             f"{v.pool_stride} over the patch grid before the projector, no newline; "
             f"{model.count_image_tokens.count_video_tokens(1)} tokens per frame",
             "- the video processor (LlavaNextVideoVideoProcessor) needs torchvision to load"]
    saver = save_video_processor(model, template, "LlavaNextVideoProcessor", "LlavaNextVideoVideoProcessor")
    return write_llava_family(model, src, out_dir, template, LlavaNextVideoForConditionalGeneration, cfg, saver,
                              notes, title="LLaVA-NeXT-Video-style")
