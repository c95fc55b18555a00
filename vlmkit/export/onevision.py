"""LLaVA-OneVision target: a video model whose parts are LLaVA-OneVision's exports to transformers'
`LlavaOnevisionForConditionalGeneration` (weights, config, processor files, model card).

    export_llava_onevision(model_or_dir, out_dir)   CLIP / SigLIP + mlp2x_gelu + AnyRes (unpad) images, optionally
        tiling.anyres_max; video.pool bilinear, pool_stride 2 (after the connector), newline video
        -> LlavaOnevisionForConditionalGeneration

What maps, setting by setting (the rest is refused by name):
    images   AnyRes base tile + the unpadded canvas grid, image_newline after each row (LLaVA-NeXT's layout).
             tiling.anyres_max N -> vision_aspect_ratio "anyres_max_N" (same rule: the unpadded grid resized
             bilinearly when sqrt(h * w / (N * g * g)) > 1.1); without anyres_max, N is the largest canvas's tile
             count, so the unpadded grid (at most that many tiles' worth) never triggers the downscale.
    video    every frame one tile through the tower, feature select, projector, then `apply_pooling` (bilinear
             to ceil(h / 2) x ceil(w / 2), align_corners false) = vlmkit's pool bilinear, pool_stride 2;
             one image_newline after each video = newline video with the shared image_newline.
    counts   the processor's num_image_tokens is a tile's tower tokens (with CLS for CLIP, minus one by the
             'default' strategy): its image and video counts are vlmkit's counter's.

One difference no setting can remove: OneVision's processor sees a sample with several images (a nested list
per sample) as "multi-image" and gives each image one padded tile plus a newline (its single-patch branch);
vlmkit tiles every image. Prompts with one image per sample (any number of videos), or images passed as a flat
list, are exact. transformers' video processors need torchvision: the video processor's settings are written
as JSON (as video.py does for LlavaNextVideo); the image processor and tokenizer load without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import prepare
from .llava import _baked_vision_config_and_state, _processor, _strategy, check_anyres_llava_parts, \
    llava_next_config, llava_next_image_processor, write_llava_family
from .video import check_video_common, processor_writer, video_processor_dict

NATIVE_CLASSES = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def check_llava_onevision_exportable(model) -> None:
    """Raise ValueError naming the setting when `model` has no exact LlavaOnevisionForConditionalGeneration
    equivalent."""
    check_video_common(model, "LlavaOnevision")
    v = model.config.video
    if v.pool != "bilinear":
        raise ValueError(f"cannot export video.pool {v.pool!r} to LlavaOnevision: its apply_pooling resizes the "
                         "projector's output bilinearly (video.pool bilinear); average / max before the connector "
                         "is LlavaNextVideo's (its newline: none)")
    if v.pool_stride != 2:
        raise ValueError(f"cannot export video.pool_stride {v.pool_stride} to LlavaOnevision: its apply_pooling "
                         "resizes each frame's grid to ceil(h / 2) x ceil(w / 2) (pool_stride 2)")
    if v.newline != "video":
        raise ValueError(f"cannot export video.newline {v.newline!r} to LlavaOnevision: it appends one "
                         "image_newline after each whole video (newline video)")
    check_anyres_llava_parts(model, "LlavaOnevision")


def vision_aspect_ratio(model) -> str:
    """OneVision's `anyres_max_N`: tiling.anyres_max, or (none set) the most tiles of any canvas, with which the
    downscale never fires (the unpadded grid holds at most that many tiles' worth of features: ratio <= 1)."""
    t = model.tiling
    n = t.anyres_max if t.anyres_max is not None else max(h * w for h, w in t.pinpoints) // (t.tile * t.tile)
    return f"anyres_max_{n}"


def llava_onevision_config(model):
    from transformers import LlavaOnevisionConfig

    next_cfg = llava_next_config(model)
    base = next_cfg.to_dict()
    keep = ("image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
            "multimodal_projector_bias", "tie_word_embeddings")
    vision, _ = _baked_vision_config_and_state(model)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=next_cfg.text_config,
                               image_token_index=model.image_token_id, video_token_index=model.video_token_id,
                               vision_aspect_ratio=vision_aspect_ratio(model), **{k: base[k] for k in keep})
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def llava_onevision_image_processor(model):
    """LlavaOnevisionImageProcessor (PIL backend) with the settings of vlmkit's AnyRes (the LlavaNext ones: the
    same canvases, base tile, black padding, bicubic, normalisation)."""
    from transformers import LlavaOnevisionImageProcessorPil

    kw = {k: v for k, v in llava_next_image_processor(model).to_dict().items()
          if k not in ("image_processor_type", "crop_size", "do_center_crop")}
    return LlavaOnevisionImageProcessorPil(**kw)


def processor_settings(model) -> dict:
    """processor_config.json's own keys: num_image_tokens as OneVision counts it (a tile's tower tokens, the CLS
    token included when the 'default' strategy drops it), the strategy, the tokens and vision_aspect_ratio."""
    return {"processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": model.count_image_tokens.tokens_per_tile + model.encoder.num_prefix_tokens,
            "vision_feature_select_strategy": _strategy(model), "vision_aspect_ratio": vision_aspect_ratio(model),
            "image_token": model.config.llm.image_token, "video_token": model.config.video.token}


def save_onevision_processor(model, template: str | None):
    """Processor files without instantiating the processor (its video processor needs torchvision): the
    tokenizer and chat template saved through a LlavaNext processor, OneVision's image processor, then
    processor_config.json rewritten as LlavaOnevisionProcessor's (and video_preprocessor_config.json)."""
    from transformers import LlavaNextProcessor

    text_side = _processor(LlavaNextProcessor, llava_next_image_processor(model), model, template)
    image = llava_onevision_image_processor(model)
    video = video_processor_dict(model, "LlavaOnevisionVideoProcessor")
    return processor_writer(text_side, image, video, {**processor_settings(model),
                                                      "image_processor": json.loads(image.to_json_string())},
                            drop=("patch_size", "num_additional_image_tokens"))  # LlavaNext's, not OneVision's


def export_llava_onevision(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native LlavaOnevision checkpoint (weights, config, processor files, model card)."""
    return write_llava_onevision(*prepare(model_or_dir), out_dir, template)


def write_llava_onevision(model, src, out_dir, template=None) -> Path:
    """`export_llava_onevision` of a model already prepared (`common.prepare`)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    check_llava_onevision_exportable(model)
    cfg = llava_onevision_config(model)
    counter, t = model.count_image_tokens, model.tiling
    rows, cols = counter.frame_grid()
    notes = [f"- AnyRes images (LLaVA-OneVision): canvases {[list(p) for p in t.pinpoints]}, unpad, "
             f"`image_newline` after each feature row, vision_aspect_ratio `{cfg.vision_aspect_ratio}`"
             + ("" if t.anyres_max is not None else " (never downscales: the model was trained without anyres_max)"),
             f"- video: each frame one {model.encoder.image_size}px tile, projector, bilinear pooling to {rows}x{cols} "
             f"({rows * cols} tokens per frame), one `image_newline` after each video",
             "- a sample with several images (a nested image list) is OneVision's multi-image case: one padded tile "
             "+ newline per image, where vlmkit tiles each image; pass one image per sample (or a flat list) to "
             "match vlmkit",
             "- the video processor (LlavaOnevisionVideoProcessor) needs torchvision to load"]
    return write_llava_family(model, src, out_dir, template, LlavaOnevisionForConditionalGeneration, cfg,
                              save_onevision_processor(model, template), notes, title="LLaVA-OneVision-style")
