"""Export to transformers-native `InternVLForConditionalGeneration` (and import it back).

    export_internvl(model_or_dir, out_dir)   InternViT + pixel_shuffle (+ internvl tiling) + any causal LM ->
                                             a folder AutoModelForImageTextToText / AutoProcessor load
    import_internvl(dir_or_hub_id)           an InternVL checkpoint -> VLM, to fine-tune it with vlmkit

How vlmkit's parts map onto InternVL:

    vlmkit                                   InternVL
    internvit, feature_layer -1, CLS dropped  vision_feature_layer -1 (last_hidden_state) or, when the tower ends in
                                             a LayerNorm (use_mean_pooling false), num_hidden_layers: the same
                                             hidden state before that norm; select strategy 'default'
    pixel_shuffle, scale s                   downsample_ratio s; InternVLMultiModalProjector (same submodule names)
    tiling internvl (min, max, thumbnail)    GotOcr2ImageProcessor crop_to_patches, min/max_patches, thumbnail last
    tiling none, image_aspect resize         max_patches 1: one tile, the image stretched to it
    `<image>` expanded to N placeholders     `<img>` + context token x N + `</img>` (InternVLProcessor)

The context token is the model's own image token (`llm.image_token`; `<IMG_CONTEXT>` is InternVL's
name), so image_token_id does not change. `<img>` / `</img>` (and `<video>`, which InternVLProcessor
requires) are added to the exported tokenizer when missing, their embedding (and lm_head) rows set to
the mean of the existing rows: a model trained by vlmkit never saw them (vlmkit's prompts have no
frame around the placeholders), so the export logs it. Two known differences of the native processor:
with several images in one prompt each gets max_patches tiles (vlmkit's training gives each
max(1, max_tiles // n)); with min_tiles > 1 it breaks exact same-tile-count ties in a different order.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .common import (WHY_NOT_CONNECTOR, build_native, check_llm, empty_vlm, fill_weights, llm_parts,
                     load_checked_tokenizer, model_card, prepare, read_processor_config, resolve_template,
                     template_to_jinja, text_config_of, to_llava_state, write_export)

logger = logging.getLogger(__name__)

# model_type -> transformers class of the target this file writes (vlmkit.export registers it)
NATIVE_CLASSES = {"internvl": "InternVLForConditionalGeneration"}

START, END, VIDEO = "<img>", "</img>", "<video>"


# ---- checks ---------------------------------------------------------------------------------
def check_internvl_exportable(model) -> None:
    """Raise ValueError with the reason when `model` has no exact InternVLForConditionalGeneration equivalent."""
    enc, conn, name = model.encoder, model.connector, model.config.connector.name
    vt = enc.model_type  # fused: its members' types joined by "+"
    if enc.kind != "internvit" or vt != "internvl_vision":
        raise ValueError(f"cannot export encoder {enc.kind!r} ({vt}) to InternVL: InternVLForConditionalGeneration's "
                         "vision tower is InternViT (internvl_vision); CLIP / SigLIP with mlp2x_gelu export to "
                         "Llava / LlavaNext")
    if name != "pixel_shuffle":
        why = WHY_NOT_CONNECTOR.get(name, "InternVLMultiModalProjector is pixel shuffle -> LayerNorm -> Linear -> "
                                          "GELU -> Linear (connector pixel_shuffle)")
        raise ValueError(f"cannot export connector {name!r} (encoder {enc.kind!r}) to InternVL: {why}")
    ln = conn.layer_norm
    if not (isinstance(ln, torch.nn.LayerNorm) and ln.elementwise_affine and ln.bias is not None and ln.eps == 1e-5):
        raise ValueError("cannot export the pixel_shuffle connector: InternVL's projector LayerNorm has eps 1e-5 "
                         "with weight and bias")
    if not isinstance(conn.act, torch.nn.GELU) or conn.act.approximate != "none":
        raise ValueError("cannot export the connector: InternVL's projector_hidden_act 'gelu' is the exact GELU")
    if enc.num_prefix_tokens != 1:
        raise ValueError(f"cannot export {enc.kind!r} dropping {enc.num_prefix_tokens} prefix tokens: InternVL's "
                         "'default' strategy drops exactly the CLS token")
    t = model.config.tiling
    if t.mode == "anyres":
        raise ValueError("cannot export AnyRes tiling to InternVL: InternVL's processor cuts dynamic tiles "
                         "(tiling internvl); AnyRes belongs to LlavaNext (CLIP / SigLIP + mlp2x_gelu)")
    if t.mode == "none" and model.config.encoder.image_aspect != "resize":
        raise ValueError("cannot export image_aspect 'pad' without tiling to InternVL: its image processor "
                         "stretches the image to the tile (image_aspect resize); it has no pad-to-square mode")
    if t.mode == "internvl" and not t.thumbnail and t.max_tiles > 1:
        raise ValueError("cannot export internvl tiling with thumbnail: false: InternVL's image processor always "
                         "adds the thumbnail after several tiles")
    check_llm(model, "InternVL")
    n = enc.model.config.num_hidden_layers
    if not -(n + 1) <= enc.feature_layer <= n:
        raise ValueError(f"feature_layer {enc.feature_layer} cannot be expressed as vision_feature_layer")
    if model.llm.config.tie_word_embeddings and _embedding_key(model.llm) != "model.language_model.embed_tokens.weight":
        raise ValueError(f"cannot export LLM {model.llm.config.model_type!r} with tied embeddings to InternVL: "
                         "InternVLForConditionalGeneration ties lm_head to language_model.embed_tokens, which this "
                         "LLM does not have")


def vision_feature_layer(model) -> int:
    """InternVL's vision_feature_layer for vlmkit's feature_layer (see the module docstring)."""
    e = model.encoder
    if e.feature_layer == -1 and not isinstance(e.model.layernorm, torch.nn.Identity):
        return e.model.config.num_hidden_layers  # hidden_states[N] is hidden_states[-1], before the final norm
    return e.feature_layer


# ---- tokens ---------------------------------------------------------------------------------
def _embedding_key(llm) -> str:
    """InternVL name of the LLM's input embedding weight."""
    prefix, _ = llm_parts(llm)
    emb = llm.get_input_embeddings()
    name = next(n for n, m in llm.named_modules() if m is emb)
    if not name.startswith(prefix + "."):
        raise ValueError(f"cannot export LLM {type(llm).__name__}: its input embeddings are outside {prefix!r}")
    return "model.language_model." + name[len(prefix) + 1:] + ".weight"


def missing_frame_tokens(tokenizer) -> list[str]:
    """`<img>`, `</img>`, `<video>` that the tokenizer lacks (InternVLProcessor needs all three)."""
    vocab = tokenizer.get_vocab()
    return [t for t in (START, END, VIDEO) if t not in vocab]


def grow_vocab(state: dict[str, torch.Tensor], model, n_new: int) -> int:
    """Append `n_new` rows to the input embeddings and lm_head in `state` (InternVL names), each the mean
    of the existing rows (so a new token's logit is the mean logit: never the greedy choice). Returns the new
    vocabulary size."""
    emb_key = _embedding_key(model.llm)
    old = state[emb_key]  # [V, D]
    for k in [emb_key] + [k for k in state if k.startswith("lm_head.")]:
        w = state[k]
        if w.shape[0] != old.shape[0]:
            raise ValueError(f"cannot grow {k} {tuple(w.shape)}: it is not a vocabulary-sized tensor")
        mean = w.float().mean(0, keepdim=True).to(w.dtype)  # [1, ...]
        state[k] = torch.cat([w, mean.expand(n_new, *w.shape[1:])]).contiguous()  # [V + n, ...]
    return old.shape[0] + n_new


def internvl_tokenizer(model, folder: Path) -> None:
    """Save the model's tokenizer with the frame tokens added and named as InternVLProcessor reads them."""
    import copy

    tok = copy.deepcopy(model.tokenizer)
    missing = missing_frame_tokens(tok)
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if len(tok) != len(model.tokenizer) + len(missing):
        raise ValueError(f"adding {missing} to the tokenizer gave {len(tok)} tokens, expected "
                         f"{len(model.tokenizer) + len(missing)}")
    tok.save_pretrained(str(folder))
    # transformers reads `<name>_token` keys of tokenizer_config.json as named special tokens
    # (tokenizer.start_image_token, .context_image_token_id, ...), which InternVLProcessor uses
    f = folder / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(start_image_token=START, end_image_token=END, context_image_token=model.config.llm.image_token,
               video_token=VIDEO, processor_class="InternVLProcessor")
    f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ---- processor and config -------------------------------------------------------------------
def tile_bounds(model) -> tuple[int, int]:
    """(min_patches, max_patches) of the image processor: vlmkit's tile bounds, (1, 1) without tiling."""
    t = model.config.tiling
    return (t.min_tiles, t.max_tiles) if t.mode == "internvl" else (1, 1)


def internvl_image_processor(model):
    """GotOcr2ImageProcessor (PIL backend) cutting vlmkit's internvl tiles, thumbnail last."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.image_utils import PILImageResampling

    e = model.encoder
    lo, hi = tile_bounds(model)
    return GotOcr2ImageProcessorPil(
        crop_to_patches=hi > 1, min_patches=lo, max_patches=hi, size={"height": e.image_size, "width": e.image_size},
        resample=PILImageResampling.BICUBIC, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(e.mean), image_std=list(e.std), do_convert_rgb=True)


def save_internvl_processor(model, folder: Path, template: str | None = None) -> None:
    """The files AutoProcessor reads as an InternVLProcessor: tokenizer, processor_config.json (image and video
    processor, image_seq_length), chat_template.jinja, and preprocessor_config.json (older loaders).

    Written directly: building an InternVLProcessor object needs its video processor, i.e. torchvision."""
    from ..data.conversation import get_template

    internvl_tokenizer(model, folder)
    ip = internvl_image_processor(model)
    ip.save_pretrained(str(folder))
    e = model.encoder
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": e.image_size, "width": e.image_size},
             "image_mean": list(e.mean), "image_std": list(e.std)}
    proc = {"processor_class": "InternVLProcessor", "image_seq_length": model.count_image_tokens.tokens_per_tile,
            "image_processor": ip.to_dict(), "video_processor": video}
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
    chat = template_to_jinja(get_template(template or model.config.template), model.config.llm.image_token,
                             model.tokenizer)
    (folder / "chat_template.jinja").write_text(chat)


def internvl_config(model, vocab_size: int):
    from transformers import InternVLConfig

    e, llm = model.encoder, model.llm
    vision_config = e.model.config.__class__.from_dict(e.model.config.to_dict())
    vision_config._name_or_path = ""
    text_config = text_config_of(llm)
    text_config.vocab_size = vocab_size
    cfg = InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=model.image_token_id,
        image_seq_length=model.count_image_tokens.tokens_per_tile, downsample_ratio=float(model.connector.scale),
        projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer(model),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    cfg.dtype = next(model.parameters()).dtype
    return cfg


# ---- export ---------------------------------------------------------------------------------
def export_internvl(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native InternVL checkpoint (weights, config, processor, chat template, model card)."""
    return write_internvl(*prepare(model_or_dir), out_dir, template)


def write_internvl(model, src, out_dir, template=None) -> Path:
    """`export_internvl` of a model already prepared (`common.prepare`: loaded, LoRA merged); `src` its folder or
    None."""
    from transformers import InternVLForConditionalGeneration

    check_internvl_exportable(model)
    state = to_llava_state(model)
    missing = missing_frame_tokens(model.tokenizer)
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    if missing:
        if len(model.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(model.tokenizer)} tokens, the LLM's embeddings {vocab} rows")
        logger.warning("InternVL export: %s added to the tokenizer (ids %d..), embedding rows = mean of the others; "
                       "the model never saw them, and InternVL's prompts put them around every image",
                       missing, len(model.tokenizer))
        # new tokens get ids len(tokenizer)...; rows up to that id already exist when the LLM's vocabulary is padded
        n_new = len(model.tokenizer) + len(missing) - vocab
        if n_new > 0:
            vocab = grow_vocab(state, model, n_new)
    cfg = internvl_config(model, vocab)
    hf = build_native(InternVLForConditionalGeneration, cfg, state, model.tokenizer, model.llm.generation_config)
    lo, hi = tile_bounds(model)
    notes = [f"- tiling: {'InternVL dynamic tiles' if hi > 1 else 'one tile (image stretched to it)'}, "
             f"{lo}..{hi} tiles{', thumbnail last' if hi > 1 else ''}; prompt form `<img>` + "
             f"`{model.config.llm.image_token}` x {model.count_image_tokens.tokens_per_tile} per tile + `</img>`",
             f"- vision_feature_layer {cfg.vision_feature_layer} (vlmkit feature_layer {model.encoder.feature_layer}), "
             f"pixel shuffle downsample_ratio {cfg.downsample_ratio}"]
    if hi > 1:
        notes.append(f"- differs from vlmkit's training data: with n images in one prompt the processor gives each "
                     f"up to {hi} tiles (vlmkit: max(1, {hi} // n))"
                     + ("; with min_tiles > 1 exact same-count ties between grids may break differently"
                        if lo > 1 else ""))
    if missing:
        notes.append(f"- tokens {missing} added by the export (rows = mean of the others; not trained by vlmkit)")
    return write_export(out_dir, hf, lambda folder: save_internvl_processor(model, folder, template),
                        model_card(model, cfg, template or model.config.template, src, notes=notes,
                                   title="InternVL-style"))


# ---- import ---------------------------------------------------------------------------------
def import_internvl(path: str | os.PathLike, template: str | None = None, dtype: torch.dtype | None = None):
    """A transformers-native InternVL checkpoint (folder or hub id) -> a vlmkit VLM ready to fine-tune.

    InternViT + pixel_shuffle (downsample_ratio) + the LLM; the image processor's min/max_patches become
    internvl tiling (max_patches 1: no tiling, image_aspect resize); the context token becomes the image token.
    """
    from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

    from ..config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig

    path = str(path)
    cfg = AutoConfig.from_pretrained(path)
    _check_importable(path, cfg)
    layer = cfg.vision_feature_layer
    proc_cfg, pre = read_processor_config(path)
    size = pre.get("size") or {}
    image_size = int(size.get("height") or size.get("shortest_edge") or cfg.vision_config.image_size[0])
    lo, hi = int(pre.get("min_patches", 1)), int(pre.get("max_patches", 12))
    # InternVLProcessor crops to patches by default whatever the image processor says; max_patches 1 gives one tile
    tiling = TilingConfig(mode="internvl", min_tiles=lo, max_tiles=hi) if hi > 1 else TilingConfig()
    mean, std = pre.get("image_mean"), pre.get("image_std")

    image_token = getattr(AutoTokenizer.from_pretrained(path), "context_image_token", None) or "<IMG_CONTEXT>"
    tokenizer = load_checked_tokenizer(path, image_token, cfg.image_token_id, what="context token")
    if template is None:
        template = resolve_template(path, proc_cfg, image_token, tokenizer)

    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    text_config = hf.config.text_config
    scale = float(cfg.downsample_ratio)
    mc = ModelConfig(
        encoder=EncoderConfig(name="internvit", config=hf.config.vision_config.to_dict(), feature_layer=layer,
                              image_aspect="resize", image_size=image_size,
                              image_mean=list(mean) if mean else None, image_std=list(std) if std else None),
        connector=ConnectorConfig("pixel_shuffle", {"scale": scale}),
        llm=LLMConfig(config=text_config.to_dict(), tokenizer=path, image_token=image_token),
        template=template, tiling=tiling,
    )
    model = empty_vlm(mc, hf.model.vision_tower, text_config, tokenizer, mean, std)
    seq = proc_cfg.get("image_seq_length")
    if seq is not None and seq != model.count_image_tokens.tokens_per_tile:
        raise ValueError(f"{path}: image_seq_length {seq} in the processor, but the tower and pixel shuffle give "
                         f"{model.count_image_tokens.tokens_per_tile} tokens per {image_size}px tile")
    return fill_weights(model, hf, path, dtype)


def _check_importable(path: str, cfg) -> None:
    """ValueError naming what vlmkit cannot hold in an InternVL config."""
    if cfg.model_type not in NATIVE_CLASSES:
        raise ValueError(f"{path}: model_type {cfg.model_type!r}; import_internvl reads InternVLForConditionalGeneration "
                         "checkpoints (model_type 'internvl')")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(f"{path}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}; vlmkit's "
                         "internvit encoder drops the CLS token ('default')")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}: vision_feature_layer {layer} (several layers concatenated); vlmkit uses one")
    if layer == -1 and not cfg.vision_config.use_mean_pooling:
        raise ValueError(f"{path}: vision_feature_layer -1 reads last_hidden_state after the vision tower's final "
                         "LayerNorm (use_mean_pooling false); vlmkit reads hidden_states, before that norm")
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"{path}: projector_hidden_act {cfg.projector_hidden_act!r}; vlmkit's pixel_shuffle uses "
                         "the exact GELU")
