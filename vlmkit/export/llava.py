"""Llava and LlavaNext targets: export to transformers-native `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration` (and import them back).

    export_llava(model_or_dir, out_dir)        CLIP / SigLIP + mlp2x_gelu, no tiling         -> Llava
    export_llava_next(model_or_dir, out_dir)   CLIP / SigLIP + mlp2x_gelu + AnyRes (unpad)   -> LlavaNext
    import_llava(dir_or_hub_id)                a Llava / LlavaNext checkpoint -> VLM (LlavaNext as AnyRes tiling)

The exported processor reproduces vlmkit's preprocessing (Llava: pad to a square with the mean colour, bicubic
resize, normalise; LlavaNext: the same AnyRes canvases, base tile first). A part Llava cannot hold raises ValueError
naming the part and the reason. Weight names, chat template and token ids: see common.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .common import (WHY_NOT_CONNECTOR, build_native, check_llm, empty_vlm, fill_weights, load_checked_tokenizer,
                     model_card, prepare, read_processor_config, resolve_template, template_to_jinja, text_config_of,
                     to_llava_state, write_export)

logger = logging.getLogger(__name__)

# model_type -> transformers class of the targets this file writes (vlmkit.export registers them)
NATIVE_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


# vlmkit encoder kind -> transformers vision model types that Llava (and vLLM's / SGLang's Llava) can hold
LLAVA_VISION_TYPES = {"clip": ("clip_vision_model",), "siglip2": ("siglip_vision_model",)}
VISION_TYPE_TO_KIND = {"clip_vision_model": "clip", "siglip_vision_model": "siglip2"}

_WHY_NOT = {
    "dinov2": "LlavaForConditionalGeneration would run a DINOv2 tower in transformers, but vLLM's and SGLang's "
              "Llava accept only CLIP / SigLIP vision towers, so the export would not be servable; and "
              "DINOv2 with registers has 1 + registers prefix tokens while Llava can drop only the CLS token",
    "internvit": "InternViT belongs to transformers' InternVLForConditionalGeneration, whose projector is "
                 "pixel-shuffle + LayerNorm + MLP, not Llava's 2-layer MLP; vLLM's / SGLang's Llava accept only "
                 "CLIP / SigLIP vision towers",
    "hf": "Llava's vision tower and vLLM's / SGLang's Llava accept only CLIP / SigLIP vision towers, and a generic "
          "backbone's token layout (special tokens, feature maps, stages) has no Llava equivalent",
    "fused": "Llava holds one vision tower; several towers with concatenated features have no native "
             "transformers (or vLLM / SGLang Llava) equivalent",
}


# ---- checks ---------------------------------------------------------------------------------
def check_exportable(model) -> None:
    """Raise ValueError with the reason when `model` has no exact LlavaForConditionalGeneration equivalent."""
    mode = getattr(getattr(model.config, "tiling", None), "mode", "none")
    if mode != "none":
        raise ValueError(f"cannot export {mode} tiling to Llava: LlavaForConditionalGeneration sees one tile per "
                         f"image (AnyRes exports to LlavaNextForConditionalGeneration, InternVL tiling to "
                         f"InternVLForConditionalGeneration: use export_model)")
    check_llava_parts(model, "Llava")


def check_llava_parts(model, target: str = "Llava") -> None:
    """Encoder, connector and LLM checks shared by Llava and LlavaNext (`target` names the class in errors)."""
    enc, conn = model.encoder, model.connector
    name = model.config.connector.name
    vt = enc.model_type
    if enc.kind not in LLAVA_VISION_TYPES:
        raise ValueError(f"cannot export encoder {enc.kind!r} ({vt}) with connector {name!r} to {target}: "
                         f"{_WHY_NOT.get(enc.kind, f'{target} accepts only CLIP / SigLIP vision towers')}")
    if vt not in LLAVA_VISION_TYPES[enc.kind]:
        why = ("SigLIP 2 NaFlex needs pixel_attention_mask and spatial_shapes, which Llava does not pass; "
               "use a fixed-resolution siglip_vision_model" if vt == "siglip2_vision_model" else
               f"{target} accepts only {', '.join(t for ts in LLAVA_VISION_TYPES.values() for t in ts)}")
        raise ValueError(f"cannot export vision model type {vt!r} to {target}: {why}")
    if enc.num_prefix_tokens not in (0, 1):
        raise ValueError(f"cannot export {enc.kind!r}: it drops {enc.num_prefix_tokens} prefix tokens, {target}'s "
                         "vision_feature_select_strategy drops either none ('full') or one CLS token ('default')")
    if name in WHY_NOT_CONNECTOR:
        raise ValueError(f"cannot export connector {name!r} to {target}: {WHY_NOT_CONNECTOR[name]}")
    if name != "mlp2x_gelu" or not hasattr(conn, "linear_1"):
        raise ValueError(f"cannot export connector {name!r} to {target}: its projector is exactly "
                         "Linear -> GELU -> Linear (mlp2x_gelu)")
    if conn.linear_2 is None or len(conn.extra) or conn.linear_1.bias is None or conn.linear_2.bias is None:
        depth = 1 if conn.linear_2 is None else 2 + len(conn.extra)
        raise ValueError(f"cannot export mlp2x_gelu with depth {depth} to {target}: its projector "
                         "has exactly two biased linear layers (depth 2)")
    if not isinstance(conn.act, torch.nn.GELU) or conn.act.approximate != "none":
        raise ValueError(f"cannot export the connector: {target}'s projector_hidden_act 'gelu' is the exact GELU")
    check_llm(model, target)
    if not -(enc.model.config.num_hidden_layers + 1) <= enc.feature_layer <= enc.model.config.num_hidden_layers:
        raise ValueError(f"feature_layer {enc.feature_layer} cannot be expressed as vision_feature_layer")


def check_llava_next_exportable(model) -> None:
    """Raise ValueError with the reason when `model` has no exact LlavaNextForConditionalGeneration equivalent."""
    t = model.config.tiling
    if t.mode == "anyres" and t.unpad and t.anyres_max is not None:
        raise ValueError(f"cannot export tiling.anyres_max {t.anyres_max} to LlavaNext: the downscale of the feature "
                         "grid is LLaVA-OneVision's (LlavaOnevisionForConditionalGeneration, which vlmkit writes for "
                         "a model with model.video pool bilinear, newline video); drop anyres_max for LlavaNext")
    check_anyres_llava_parts(model, "LlavaNext")


def check_anyres_llava_parts(model, target: str) -> None:
    """What LlavaNext and LlavaOnevision share: AnyRes with unpad (base tile, unpadded grid, image_newline after
    each row) over the Llava parts (`target` names the class in errors)."""
    t = model.config.tiling
    if t.mode != "anyres":
        raise ValueError(f"cannot export {t.mode} tiling to {target}: {target}ForConditionalGeneration is AnyRes "
                         "(tiling.mode anyres)")
    if not t.unpad:
        raise ValueError(f"cannot export AnyRes with unpad: false to {target}: {target}ForConditionalGeneration "
                         "always crops the padding from the feature grid and appends image_newline after each row "
                         "(spatial_unpad); vlmkit's `spatial` layout has no native class")
    if model.image_newline is None:
        raise ValueError(f"cannot export to {target}: the model has no image_newline")
    check_llava_parts(model, target)


# ---- processor ------------------------------------------------------------------------------
def llava_image_processor(model):
    """LlavaImageProcessor (PIL backend) with vlmkit's ImageTransform settings."""
    from transformers.image_utils import PILImageResampling
    from transformers import LlavaImageProcessorPil

    e = model.encoder
    size = {"height": e.image_size, "width": e.image_size}
    return LlavaImageProcessorPil(
        do_pad=model.config.encoder.image_aspect == "pad", do_resize=True, size=size,
        resample=PILImageResampling.BICUBIC, do_center_crop=False, crop_size=size,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(e.mean), image_std=list(e.std), do_convert_rgb=True)


def llava_processor(model, template: str | None = None):
    from transformers import LlavaProcessor

    return _processor(LlavaProcessor, llava_image_processor(model), model, template)


def _processor(cls, image_processor, model, template: str | None):
    """A Llava-family processor (LlavaProcessor, LlavaNextProcessor): the image processor, the trained tokenizer,
    vlmkit's chat template as Jinja and the placeholder settings of the model's encoder."""
    from ..data.conversation import get_template

    tok = model.tokenizer
    video = getattr(model.config, "video", None)
    chat = template_to_jinja(get_template(template or model.config.template), model.config.llm.image_token, tok,
                             None if video is None else video.token)
    return cls(image_processor=image_processor, tokenizer=tok, patch_size=model.encoder.patch_size,
               vision_feature_select_strategy=_strategy(model),
               num_additional_image_tokens=model.encoder.num_prefix_tokens,
               chat_template=chat, image_token=model.config.llm.image_token)


def llava_next_image_processor(model):
    """LlavaNextImageProcessor (PIL backend): vlmkit's AnyRes canvases (TileSpec.pinpoints, [height, width]),
    base tile resized to the tile, the canvas padded with black and cut row-major, normalised."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import PILImageResampling

    e = model.encoder
    size = {"height": e.image_size, "width": e.image_size}
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints], do_resize=True, size=size,
        resample=PILImageResampling.BICUBIC, do_center_crop=False, crop_size=size,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(e.mean), image_std=list(e.std), do_convert_rgb=True, do_pad=True)


def llava_next_processor(model, template: str | None = None):
    from transformers import LlavaNextProcessor

    return _processor(LlavaNextProcessor, llava_next_image_processor(model), model, template)


def _strategy(model) -> str:
    """Llava's vision_feature_select_strategy: 'default' drops the CLS token (CLIP), 'full' keeps all (SigLIP)."""
    return "default" if model.encoder.num_prefix_tokens else "full"


# ---- config ---------------------------------------------------------------------------------
def _baked_vision_config_and_state(model):
    """Vision config (and, for a non-native input size, position embeddings interpolated once)."""
    e = model.encoder
    cfg = e.model.config.__class__.from_dict(e.model.config.to_dict())
    cfg._name_or_path = ""  # not the local path the parts were loaded from
    extra = {}
    if e.image_size != e.native_size:
        # vlmkit interpolates the position table at each forward; Llava does not: store the interpolated table
        found = [(n, m) for n, m in e.model.named_modules()
                 if hasattr(m, "interpolate_pos_encoding") and isinstance(getattr(m, "position_embedding", None),
                                                                          torch.nn.Embedding)]
        if len(found) != 1:
            raise ValueError(f"cannot export {e.kind!r} at {e.image_size}px (native {e.native_size}px): Llava does "
                             "not interpolate position embeddings and vlmkit found no position table to resize")
        name, emb = found[0]
        n = (e.image_size // e.patch_size) ** 2
        dummy = torch.zeros(1, n + e.num_prefix_tokens, emb.embed_dim, dtype=emb.position_embedding.weight.dtype)
        with torch.no_grad():
            table = emb.interpolate_pos_encoding(dummy, e.image_size, e.image_size)[0]  # [prefix + n, C]
        key = f"{name}.position_embedding.weight" if name else "position_embedding.weight"
        extra["model.vision_tower." + key] = table.contiguous()
        cfg.image_size = e.image_size
    return cfg, extra


def llava_config(model):
    from transformers import LlavaConfig

    e, llm = model.encoder, model.llm
    vision_config, _ = _baked_vision_config_and_state(model)
    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text_config_of(llm),
        image_token_id=model.image_token_id, image_seq_length=e.num_tokens,
        vision_feature_layer=e.feature_layer, vision_feature_select_strategy=_strategy(model),
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def llava_next_config(model):
    from transformers import LlavaNextConfig

    e, llm = model.encoder, model.llm
    vision_config, _ = _baked_vision_config_and_state(model)
    cfg = LlavaNextConfig(
        vision_config=vision_config, text_config=text_config_of(llm),
        image_token_index=model.image_token_id, image_seq_length=e.num_tokens,
        image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints],
        vision_feature_layer=e.feature_layer, vision_feature_select_strategy=_strategy(model),
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    cfg.dtype = next(model.parameters()).dtype
    return cfg


# ---- export ---------------------------------------------------------------------------------
def _save_processor(processor):
    def save(folder: Path) -> None:
        processor.save_pretrained(str(folder))
        # also the pre-v5 layout (preprocessor_config.json), read by older transformers and other loaders
        processor.image_processor.save_pretrained(str(folder))
    return save


def export_llava(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native Llava checkpoint (weights, config, processor, chat template, model card)."""
    return write_llava(*prepare(model_or_dir), out_dir, template)


def write_llava(model, src, out_dir, template=None) -> Path:
    """`export_llava` of a model already prepared (`common.prepare`: loaded, LoRA merged); `src` its folder or None."""
    from transformers import LlavaForConditionalGeneration

    check_exportable(model)
    return _write_llava_family(model, src, out_dir, template, LlavaForConditionalGeneration, llava_config(model),
                               llava_processor(model, template), title="LLaVA-style")


def _write_llava_family(model, src, out_dir, template, cls, cfg, processor, notes=(), title="") -> Path:
    """Llava and LlavaNext: `write_llava_family` with the processor object saved as it is."""
    return write_llava_family(model, src, out_dir, template, cls, cfg, _save_processor(processor), notes, title)


def write_llava_family(model, src, out_dir, template, cls, cfg, save_processor, notes=(), title="") -> Path:
    """Llava, LlavaNext, LlavaNextVideo and LlavaOnevision share the weights layout: the converted state, the
    native model `cls(cfg)`, the processor files (`save_processor(folder)`) and the model card, written together."""
    state = to_llava_state(model)
    state.update(_baked_vision_config_and_state(model)[1])
    hf = build_native(cls, cfg, state, model.tokenizer, model.llm.generation_config)
    return write_export(out_dir, hf, save_processor,
                        model_card(model, cfg, template or model.config.template, src, notes=notes, title=title))


def export_llava_next(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native LlavaNext checkpoint: AnyRes with unpad and image_newline (LLaVA-NeXT)."""
    return write_llava_next(*prepare(model_or_dir), out_dir, template)


def write_llava_next(model, src, out_dir, template=None) -> Path:
    """`export_llava_next` of a model already prepared (see `write_llava`)."""
    from transformers import LlavaNextForConditionalGeneration

    check_llava_next_exportable(model)
    notes = [f"- AnyRes (LLaVA-NeXT): canvases {[list(p) for p in model.tiling.pinpoints]} ([height, width] px), "
             "base tile first, padding cropped from the features (unpad), `image_newline` after each feature row"]
    return _write_llava_family(model, src, out_dir, template, LlavaNextForConditionalGeneration,
                               llava_next_config(model), llava_next_processor(model, template), notes,
                               title="LLaVA-NeXT-style")


# ---- import ---------------------------------------------------------------------------------
def import_llava(path: str | os.PathLike, template: str | None = None, image_aspect: str | None = None,
                 dtype: torch.dtype | None = None):
    """A transformers-native Llava or LlavaNext checkpoint (folder or hub id) -> a vlmkit VLM ready to fine-tune.

    LlavaNext becomes AnyRes tiling (its image_grid_pinpoints, unpad, image_newline).

    template: a registered template name, or None to infer it from the checkpoint's chat template
    (one written by `export_llava`; otherwise `tokenizer` when the checkpoint's template renders plain-string
    messages as growing prefixes, else vicuna_v1 with a warning). image_aspect: pad | resize, or None to read it from the image processor.
    """
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from ..config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig

    path = str(path)
    cfg = AutoConfig.from_pretrained(path)
    kind = _importable_kind(path, cfg)
    next_ = cfg.model_type == "llava_next"
    proc_cfg, pre = read_processor_config(path)
    image_aspect = _image_aspect(path, pre, image_aspect, next_)
    mean, std = pre.get("image_mean"), pre.get("image_std")
    image_token = proc_cfg.get("image_token", "<image>")
    tokenizer = load_checked_tokenizer(path, image_token, cfg.image_token_id)
    if template is None:
        template = resolve_template(path, proc_cfg, image_token, tokenizer)

    llava = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration).from_pretrained(
        path, dtype=dtype)
    tiling = (TilingConfig(mode="anyres", grid_pinpoints=[list(map(int, p)) for p in cfg.image_grid_pinpoints])
              if next_ else TilingConfig())
    vision_config, text_config = llava.config.vision_config, llava.config.text_config
    mc = ModelConfig(
        encoder=EncoderConfig(name=kind, config=vision_config.to_dict(), feature_layer=cfg.vision_feature_layer,
                              image_aspect=image_aspect, image_size=cfg.vision_config.image_size,
                              image_mean=list(mean) if mean else None, image_std=list(std) if std else None),
        connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(config=text_config.to_dict(), tokenizer=path, image_token=image_token),
        template=template, tiling=tiling,
    )
    model = empty_vlm(mc, llava.model.vision_tower, text_config, tokenizer, mean, std)
    if model.image_token_id != cfg.image_token_id:
        raise ValueError(f"{path}: image token id mismatch ({model.image_token_id} vs {cfg.image_token_id})")
    return fill_weights(model, llava, path, dtype)


def _importable_kind(path: str, cfg) -> str:
    """The vlmkit encoder kind of a Llava / LlavaNext config; ValueError naming what vlmkit cannot hold."""
    if cfg.model_type not in NATIVE_CLASSES:
        raise ValueError(f"{path}: model_type {cfg.model_type!r}; import_llava reads LlavaForConditionalGeneration "
                         "and LlavaNextForConditionalGeneration checkpoints (model_type 'llava' / 'llava_next'); "
                         "import_model reads InternVL too")
    vt = cfg.vision_config.model_type
    kind = VISION_TYPE_TO_KIND.get(vt)
    if kind is None:
        raise ValueError(f"{path}: vision tower {vt!r}; vlmkit imports CLIP and SigLIP towers")
    strategy = cfg.vision_feature_select_strategy
    want = "default" if kind == "clip" else "full"
    if strategy != want:
        raise ValueError(f"{path}: vision_feature_select_strategy {strategy!r} with a {vt} tower; vlmkit's {kind} "
                         f"encoder {'drops' if want == 'default' else 'keeps'} the first token ({want!r})")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"{path}: vision_feature_layer {cfg.vision_feature_layer} (several layers concatenated); "
                         "vlmkit uses one feature layer")
    if cfg.projector_hidden_act != "gelu" or not cfg.multimodal_projector_bias:
        raise ValueError(f"{path}: projector {cfg.projector_hidden_act!r} (bias {cfg.multimodal_projector_bias}); "
                         "vlmkit's mlp2x_gelu is Linear -> exact GELU -> Linear with biases")
    return kind


def _image_aspect(path: str, pre: dict, image_aspect: str | None, next_: bool) -> str:
    """`image_aspect` as given, else read off the image processor settings `pre`."""
    if image_aspect is not None:
        return image_aspect
    if next_:
        return "pad"  # AnyRes tiles are square: the aspect mode does not act on them
    if pre.get("do_pad"):
        return "pad"
    if pre.get("do_center_crop") and "shortest_edge" in (pre.get("size") or {}):
        # e.g. llava-hf/llava-1.5: shortest-edge resize + centre crop, which vlmkit has no mode for;
        # LLaVA-1.5 itself was trained with pad
        logger.warning("%s: the image processor resizes the shortest edge and crops the centre; vlmkit "
                       "uses 'pad' (as LLaVA-1.5 trained). Pass image_aspect= to choose.", path)
        return "pad"
    return "resize"
