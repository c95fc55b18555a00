"""Export to transformers-native models (and import them back).

    export_model(model_or_dir, out_dir)   picks the target from the model's parts:
        CLIP / SigLIP + mlp2x_gelu, no tiling            -> LlavaForConditionalGeneration      (export_llava)
        CLIP / SigLIP + mlp2x_gelu + AnyRes (unpad)      -> LlavaNextForConditionalGeneration  (export_llava_next)
        InternViT + pixel_shuffle (+ internvl tiling)    -> InternVLForConditionalGeneration   (export_internvl,
                                                            vlmkit/export_internvl.py)
    import_model(dir_or_hub_id)           a Llava / LlavaNext / InternVL checkpoint -> VLM, to fine-tune it with vlmkit

Each export writes a folder that AutoModelForImageTextToText / AutoProcessor (and so vLLM, SGLang) load
without vlmkit. Weight names (transformers 5):

    vlmkit                          Llava / LlavaNext / InternVL
    encoder.model.X              -> model.vision_tower.X
    connector.X                  -> model.multi_modal_projector.X
    image_newline                -> model.image_newline                 (LlavaNext)
    llm.<base_model_prefix>.X    -> model.language_model.X
    llm.<output embeddings>.*    -> lm_head.*

The exported processor reproduces vlmkit's preprocessing (Llava: pad to a square with the mean colour,
bicubic resize, normalise; LlavaNext: the same AnyRes canvases, base tile first; InternVL: the same
dynamic tiles, thumbnail last) and its chat template is a Jinja rendering of vlmkit's template that gives
the same ids as `encode(..., add_generation_prompt=True)`. The text config and generation_config.json hold the
bos / eos / pad ids of the tokenizer the model was trained with (where the LLM's config says otherwise, the
tokenizer wins and the export logs the change), so transformers' `generate` stops where vlmkit's does; `import`
reads them back. A combination no native class can hold raises ValueError naming the part and the reason.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights

logger = logging.getLogger(__name__)

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
# connectors no native class holds, and why (the Llava family needs mlp2x_gelu, InternVL pixel_shuffle)
WHY_NOT_CONNECTOR = {
    "qformer": "a Q-Former belongs to BLIP-2 / InstructBLIP, whose vision tower, query tokens and LM wiring are "
               "their own; Llava, LlavaNext and InternVL feed every patch through an MLP projector",
    "perceiver_resampler": "a Perceiver resampler (learned latents cross-attending to the patches) has no place in "
                           "Llava, LlavaNext or InternVL, whose projectors map each patch (or 2x2 block) to a token",
    "avgpool_mlp": "average pooling before the MLP has no place in Llava, LlavaNext or InternVL: their projectors "
                   "see every patch (InternVL folds 2x2 blocks by pixel shuffle, not by averaging)",
}


def export_target(model) -> str:
    """The native class family a model exports to: llava | llava_next | internvl (checked on export)."""
    mode = getattr(getattr(model.config, "tiling", None), "mode", "none")
    if model.encoder.kind == "internvit" or model.config.connector.name == "pixel_shuffle" or mode == "internvl":
        return "internvl"  # its checks name the part that does not fit
    return "llava_next" if mode == "anyres" else "llava"


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


def check_llm(model, target: str) -> None:
    llm = model.llm
    if getattr(llm.config, "final_logit_softcapping", None):
        raise ValueError(f"cannot export LLM {llm.config.model_type!r}: it soft-caps its logits "
                         f"(final_logit_softcapping), which {target}'s lm_head does not")


def check_llava_next_exportable(model) -> None:
    """Raise ValueError with the reason when `model` has no exact LlavaNextForConditionalGeneration equivalent."""
    t = model.config.tiling
    if t.mode != "anyres":
        raise ValueError(f"cannot export {t.mode} tiling to LlavaNext: LlavaNextForConditionalGeneration is AnyRes")
    if not t.unpad:
        raise ValueError("cannot export AnyRes with unpad: false to LlavaNext: LlavaNextForConditionalGeneration "
                         "always crops the padding from the feature grid and appends image_newline after each row "
                         "(spatial_unpad); vlmkit's `spatial` layout has no native class")
    if t.anyres_max is not None:
        raise ValueError(f"cannot export tiling.anyres_max {t.anyres_max} to LlavaNext: the downscale of the feature "
                         "grid is LLaVA-OneVision's (LlavaOnevisionForConditionalGeneration), which vlmkit does not "
                         "export (its processor needs a video processor, i.e. torchvision); drop anyres_max for "
                         "LlavaNext")
    if model.image_newline is None:
        raise ValueError("cannot export to LlavaNext: the model has no image_newline")
    check_llava_parts(model, "LlavaNext")


def _llm_parts(llm) -> tuple[str, str]:
    """(attribute of the base model, module name of the output embeddings) inside the causal LM."""
    prefix = llm.base_model_prefix
    if not prefix or getattr(llm, prefix, None) is not llm.base_model:
        raise ValueError(f"cannot export LLM {type(llm).__name__}: no base model under {prefix!r}")
    head = llm.get_output_embeddings()
    names = [n for n, m in llm.named_modules() if m is head]
    if not names:
        raise ValueError(f"cannot export LLM {type(llm).__name__}: no output embeddings")
    return prefix, names[0]


# ---- weight names ---------------------------------------------------------------------------
def to_llava_state(model) -> dict[str, torch.Tensor]:
    """vlmkit state dict -> transformers 5 Llava / LlavaNext / InternVL names (same tensors, no copies)."""
    prefix, head = _llm_parts(model.llm)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.model."):
            out["model.vision_tower." + k[len("encoder.model."):]] = v
        elif k.startswith("connector."):
            out["model.multi_modal_projector." + k[len("connector."):]] = v
        elif k == "image_newline":
            out["model.image_newline"] = v
        elif k.startswith(f"llm.{prefix}."):
            out["model.language_model." + k[len(f"llm.{prefix}."):]] = v
        elif k.startswith(f"llm.{head}."):
            out["lm_head." + k[len(f"llm.{head}."):]] = v
        else:
            raise ValueError(f"cannot export weight {k!r}: it has no place in a Llava-family / InternVL model")
    return out


def from_llava_state(state: dict[str, torch.Tensor], llm) -> dict[str, torch.Tensor]:
    """The reverse of `to_llava_state`."""
    prefix, head = _llm_parts(llm)
    rules = [("model.vision_tower.", "encoder.model."), ("model.multi_modal_projector.", "connector."),
             ("model.image_newline", "image_newline"),
             ("model.language_model.", f"llm.{prefix}."), ("lm_head.", f"llm.{head}.")]
    out = {}
    for k, v in state.items():
        for src, dst in rules:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise ValueError(f"cannot import weight {k!r}: not a Llava-family / InternVL weight vlmkit knows")
    return out


# ---- chat templates -------------------------------------------------------------------------
def _lit(s: str) -> str:
    """A Jinja string literal."""
    return json.dumps(s)


def _content_macro(image_token: str, image_sep: str) -> str:
    """Message content as text: a string as is; a list of parts as its images then its texts."""
    return ("{%- macro render(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
            "{%- for p in c if p['type'] == 'image' -%}{{ " + _lit(image_token + image_sep) + " }}{%- endfor -%}"
            "{{ c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
            "{%- endif -%}{%- endmacro -%}")


def _with_bos(body: str, template, tokenizer, image_token: str) -> str:
    """`body` (Jinja) preceded by the BOS text `encode` puts in front (`conversation.bos_text`): the BOS token and,
    for a sentencepiece-style tokenizer, the space that gives the first word its prefix space as at the start of a
    string (none when the rendering starts with the image token)."""
    from ..data.conversation import bos_glue

    if not (template.add_bos and tokenizer is not None and tokenizer.bos_token):
        return body
    glue = bos_glue(tokenizer)
    if not glue:
        return "{{ bos_token }}" + body
    return ("{%- set body -%}" + body + "{%- endset -%}{{ bos_token }}"
            "{%- if body and not body.startswith(" + _lit(image_token) + ") -%}{{ " + _lit(glue) + " }}{%- endif -%}"
            "{{ body }}")


def template_to_jinja(template, image_token: str = "<image>", tokenizer=None) -> str:
    """A Jinja chat template rendering conversations as vlmkit's `template` does.

    For a prompt (`add_generation_prompt=True`) and for conversations ending with an answer, the
    text equals `conversation.render`'s (BOS text included), so its ids are `encode`'s. A list content
    (`[{"type": "image"}, {"type": "text", ...}]`) becomes `<image>\\n` per image, then the texts.
    """
    from ..data.conversation import PlainTemplate, Template, TokenizerTemplate

    if isinstance(template, TokenizerTemplate):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
        return tokenizer.chat_template
    if isinstance(template, Template):
        t = template
        return _content_macro(image_token, "\n") + _with_bos(
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set system = " + _lit(t.system) + " -%}{%- set loop_messages = messages -%}{%- endif -%}"
            "{%- if system -%}{{ system + " + _lit(t.sep) + " }}{%- endif -%}"
            "{%- for m in loop_messages -%}"
            "{%- if m['role'] == 'user' -%}{{ " + _lit(t.user) + " + render(m['content']) }}"
            "{%- if not loop.last or add_generation_prompt -%}{{ " + _lit(t.sep + t.assistant) + " }}{%- endif -%}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{{ " + _lit(t.answer_prefix) + " + render(m['content']) + " + _lit(t.end) + " }}"
            "{%- else -%}{{ raise_exception('a ' + m['role'] + ' turn in the middle of the conversation') }}"
            "{%- endif -%}{%- endfor -%}", t, tokenizer, image_token)
    if isinstance(template, PlainTemplate):
        # image placeholders of the first user turn, then the first answer and a newline
        return _content_macro(image_token, "") + _with_bos(
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
            "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
            "{%- if users -%}{%- set c = users[0]['content'] -%}"
            "{%- if c is string -%}{{ " + _lit(image_token) + " * (c.split(" + _lit(image_token) + ") | length - 1) }}"
            "{%- else -%}{{ render(c | selectattr('type', 'equalto', 'image') | list) }}{%- endif -%}{%- endif -%}"
            "{%- if answers -%}{{ render(answers[0]['content']) + '\\n' }}{%- endif -%}", template, tokenizer,
            image_token)
    raise ValueError(f"template {getattr(template, 'name', template)!r} has no Jinja equivalent")


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

    from ..data.conversation import get_template

    tok = model.tokenizer
    chat = template_to_jinja(get_template(template or model.config.template), model.config.llm.image_token, tok)
    return LlavaProcessor(image_processor=llava_image_processor(model), tokenizer=tok,
                          patch_size=model.encoder.patch_size,
                          vision_feature_select_strategy="default" if model.encoder.num_prefix_tokens else "full",
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

    from ..data.conversation import get_template

    tok = model.tokenizer
    chat = template_to_jinja(get_template(template or model.config.template), model.config.llm.image_token, tok)
    return LlavaNextProcessor(image_processor=llava_next_image_processor(model), tokenizer=tok,
                              patch_size=model.encoder.patch_size,
                              vision_feature_select_strategy=_strategy(model),
                              num_additional_image_tokens=model.encoder.num_prefix_tokens,
                              chat_template=chat, image_token=model.config.llm.image_token)


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
    text_config = llm.config.__class__.from_dict(llm.config.to_dict())
    text_config._name_or_path = ""
    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=model.image_token_id, image_seq_length=e.num_tokens,
        vision_feature_layer=e.feature_layer,
        vision_feature_select_strategy="default" if e.num_prefix_tokens else "full",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    cfg.dtype = next(model.parameters()).dtype
    return cfg


def text_config_of(llm):
    cfg = llm.config.__class__.from_dict(llm.config.to_dict())
    cfg._name_or_path = ""
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
def _load(model_or_dir):
    from ..model import VLM

    if isinstance(model_or_dir, VLM):
        return model_or_dir, None
    from ..model import resolve_model_dir

    path = resolve_model_dir(model_or_dir)
    return VLM.from_pretrained(path), path


EXPORT_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                "internvl": "InternVLForConditionalGeneration"}


def _is_export_dir(path: Path) -> bool:
    """A folder a previous export wrote (replaced by a new export; anything else is not)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in EXPORT_TYPES
    except (OSError, ValueError):
        return False


def _prepare(model_or_dir):
    """(model, source folder or None) with LoRA adapters merged (only into a model loaded here)."""
    model, src = _load(model_or_dir)
    if getattr(model, "adapters", None):
        if src is None:
            raise ValueError(f"the model has LoRA adapters on {sorted(model.adapters)}: call model.merge_lora() "
                             "first (export does not change the model it is given), or export its saved folder")
        model.merge_lora()  # a model loaded here: fold the adapters into the weights the native class will hold
    return model, src


TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def exported_token_ids(tokenizer, text_config, generation_config) -> tuple[dict[str, int], list[str]]:
    """The bos / eos / pad ids an export writes: the tokenizer's, the ids the model was trained with and that
    vlmkit's `generate` stops and pads with (a token the tokenizer lacks, e.g. Qwen's BOS, keeps the LLM's id).
    Also a line for each value of the LLM's config or generation config they replace."""
    ids = {k: getattr(tokenizer, k) for k in TOKEN_KEYS if getattr(tokenizer, k) is not None}
    changes = []
    for key, v in ids.items():
        token = tokenizer.convert_ids_to_tokens(v)
        for name, where in (("LLM config", text_config), ("LLM generation config", generation_config)):
            old = getattr(where, key, None)
            if old != v:
                changes.append(f"{key} {old} -> {v} ({token}) in the {name}")
    return ids, changes


def build_native(cls, cfg, state: dict[str, torch.Tensor], tokenizer, generation_config):
    """An instance of transformers class `cls` holding `state` (tensors assigned, not copied); every
    parameter must be filled and nothing left over. Its text config and generation config get the tokenizer's
    bos / eos / pad ids (`exported_token_ids`): where the LLM's config disagrees, the tokenizer wins, and the
    change is logged."""
    ids, changes = exported_token_ids(tokenizer, cfg.text_config, generation_config)
    for k, v in ids.items():
        setattr(cfg.text_config, k, v)
    with init_empty_weights(include_buffers=False):
        hf = cls(cfg)
    _, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    still_empty = [n for n, p in hf.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        raise ValueError(f"vlmkit weights do not fit {cls.__name__}: "
                         f"missing {still_empty[:5]}, unexpected {unexpected[:5]}")
    gen = generation_config.__class__.from_dict(generation_config.to_dict())
    for k, v in ids.items():
        setattr(gen, k, v)
    hf.generation_config = gen
    if changes:
        logger.warning("export: token ids from the tokenizer the model was trained with, written to "
                       "generation_config.json and the text config: %s", "; ".join(changes))
    return hf


def write_export(out_dir, hf_model, save_processor, card: str) -> Path:
    """Write model + processor (`save_processor(folder)`) + README.md to a temporary folder, then move it
    to `out_dir` (replacing a previous export there, nothing else)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not _is_export_dir(out):
        raise FileExistsError(f"{out} exists and is not a Llava / LlavaNext / InternVL export; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        save_processor(tmp)
        (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_processor(processor):
    def save(folder: Path) -> None:
        processor.save_pretrained(str(folder))
        # also the pre-v5 layout (preprocessor_config.json), read by older transformers and other loaders
        processor.image_processor.save_pretrained(str(folder))
    return save


def export_llava(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native Llava checkpoint (weights, config, processor, chat template, model card)."""
    return _export_llava(*_prepare(model_or_dir), out_dir, template)


def _export_llava(model, src, out_dir, template=None) -> Path:
    from transformers import LlavaForConditionalGeneration

    check_exportable(model)
    return _write_llava_family(model, src, out_dir, template, LlavaForConditionalGeneration, llava_config(model),
                               llava_processor(model, template))


def _write_llava_family(model, src, out_dir, template, cls, cfg, processor, notes=()) -> Path:
    """Llava and LlavaNext share the weights layout: the converted state, the native model, the processor
    files and the model card, written together."""
    state = to_llava_state(model)
    state.update(_baked_vision_config_and_state(model)[1])
    hf = build_native(cls, cfg, state, model.tokenizer, model.llm.generation_config)
    return write_export(out_dir, hf, _save_processor(processor),
                        model_card(model, cfg, template or model.config.template, src, notes=notes))


def export_llava_next(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native LlavaNext checkpoint: AnyRes with unpad and image_newline (LLaVA-NeXT)."""
    return _export_llava_next(*_prepare(model_or_dir), out_dir, template)


def _export_llava_next(model, src, out_dir, template=None) -> Path:
    from transformers import LlavaNextForConditionalGeneration

    check_llava_next_exportable(model)
    notes = [f"- AnyRes (LLaVA-NeXT): canvases {[list(p) for p in model.tiling.pinpoints]} ([height, width] px), "
             "base tile first, padding cropped from the features (unpad), `image_newline` after each feature row"]
    return _write_llava_family(model, src, out_dir, template, LlavaNextForConditionalGeneration,
                               llava_next_config(model), llava_next_processor(model, template), notes)


def export_model(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Export to the native class the model's parts fit (see `export_target`); a clear error when none does.
    Returns the folder written."""
    model, src = _prepare(model_or_dir)
    target = export_target(model)
    if target == "internvl":
        from .internvl import _export_internvl

        return _export_internvl(model, src, out_dir, template)
    return (_export_llava_next if target == "llava_next" else _export_llava)(model, src, out_dir, template)


# ---- model card -----------------------------------------------------------------------------
def _count(module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _run_metrics(src: Path | None) -> list[tuple[str, dict]]:
    """metrics.json of the model folder; for a run's final model (RUN/model) also the run's and its stages'."""
    if src is None:
        return []
    files = [src / "metrics.json"]
    if src.name == "model":
        files += [src.parent / "metrics.json"]
        files += sorted(p for p in src.parent.glob("*/metrics.json") if p.parent != src)
    out = []
    for f in files:
        if f.is_file():
            try:
                out.append((str(f.relative_to(src.parent)), json.loads(f.read_text())))
            except (OSError, ValueError):
                continue
    return out


def _connector_text(model) -> str:
    e, d, name = model.encoder, model.llm.config.hidden_size, model.config.connector.name
    if name == "pixel_shuffle":
        k = model.connector.k
        return (f"`pixel_shuffle`: {k}x{k} patches -> 1 token, LayerNorm({e.out_dim * k * k}) -> "
                f"Linear({e.out_dim * k * k}->{d}) -> GELU -> Linear({d}->{d})")
    return f"`{name}`: Linear({e.out_dim}->{d}) -> GELU -> Linear({d}->{d})"


def _token_ids_text(model) -> str:
    """The model card's line on the exported bos / eos / pad ids (and what they replaced)."""
    tok = model.tokenizer
    ids, changes = exported_token_ids(tok, model.llm.config, model.llm.generation_config)
    shown = ", ".join(f"{k} {v} (`{tok.convert_ids_to_tokens(v)}`)" for k, v in ids.items())
    line = (f"- token ids: {shown}, from the tokenizer the model was trained with, in `generation_config.json` "
            "and the text config: `generate` stops where vlmkit's does")
    return line + (f" (replacing the LLM's own: {'; '.join(changes)})" if changes else "")


def model_card(model, cfg, template: str, src: Path | None, notes=()) -> str:
    """README.md of an export: the parts, features, preprocessing, template, usage and the run's metrics.
    `notes`: extra bullet lines (tiling, known differences)."""
    e, llm = model.encoder, model.llm
    ec, lc = e.model.config, llm.config
    cls = EXPORT_TYPES.get(cfg.model_type, type(cfg).__name__)
    title = {"llava": "LLaVA-style", "llava_next": "LLaVA-NeXT-style", "internvl": "InternVL-style"}.get(
        cfg.model_type, "")
    per = "tile" if model.tiling is not None else "image"
    tiled = model.tiling is not None
    rows = [
        ("vision encoder", f"{e.kind} (`{ec.model_type}`): {ec.num_hidden_layers} layers, width {ec.hidden_size}, "
                           f"patch {e.patch_size}, input {e.image_size}px", _count(e)),
        ("connector", _connector_text(model), _count(model.connector)),
        ("language model", f"`{lc.model_type}`: {lc.num_hidden_layers} layers, width {lc.hidden_size}, "
                           f"vocabulary {lc.vocab_size}", _count(llm)),
    ]
    if model.image_newline is not None:
        rows.append(("image_newline", "learned vector after each AnyRes feature row", model.image_newline.numel()))
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text",
        f"tags: [{cfg.model_type.replace('_', '-')}, vlmkit]", "---", "",
        f"# {title} vision-language model (exported from vlmkit)", "",
        f"`{cls}` checkpoint; loads with `AutoModelForImageTextToText` and `AutoProcessor` "
        "(no vlmkit needed).", "",
        "| part | what | parameters |", "|---|---|---|",
        *[f"| {a} | {b} | {_human(n)} |" for a, b, n in rows],
        f"| total | | {_human(sum(n for *_, n in rows))} |", "",
        f"- image features: hidden_states[{e.feature_layer}], select strategy "
        f"`{cfg.vision_feature_select_strategy}`, {model.count_image_tokens.tokens_per_tile} tokens per {per}",
        f"- preprocessing: "
        f"{'pad to a square with the mean colour, ' if model.config.encoder.image_aspect == 'pad' and not tiled else ''}"
        f"bicubic resize to {e.image_size}x{e.image_size}{' tiles' if tiled else ''}, mean {list(e.mean)}, "
        f"std {list(e.std)}",
        *notes,
        f"- chat template: `{template}`; image token `{model.config.llm.image_token}` (id {model.image_token_id})",
        _token_ids_text(model),
        f"- dtype: {str(cfg.dtype).replace('torch.', '')}", "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)",
        "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "inputs = processor(images=image, text=prompt, return_tensors='pt')",
        "out = model.generate(**inputs, max_new_tokens=64)",
        "```", "",
    ]
    metrics = _run_metrics(src)
    if metrics:
        lines += ["## Training metrics", ""]
        for name, m in metrics:
            shown = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            if isinstance(m.get("skipped"), list):
                shown["skipped"] = len(m["skipped"])
            lines += [f"### `{name}`", "", "| metric | value |", "|---|---|",
                      *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()],
                      ""]
    return "\n".join(lines)


# ---- import ---------------------------------------------------------------------------------
def _read_json(path: str, name: str) -> dict | None:
    from transformers.utils import cached_file

    try:
        f = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    if not f:
        return None
    with open(f) as fh:
        return json.load(fh)


def _read_text(path: str, name: str) -> str | None:
    from transformers.utils import cached_file

    try:
        f = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    return Path(f).read_text() if f else None


def infer_template(chat_template: str | None, image_token: str, tokenizer) -> str | None:
    """The registered template whose Jinja rendering is `chat_template`, else None."""
    from ..data.conversation import TokenizerTemplate
    from ..registry import TEMPLATES

    if not chat_template:
        return None
    for name in TEMPLATES.names():
        t = TEMPLATES.get(name)
        if isinstance(t, TokenizerTemplate):
            continue
        try:
            if template_to_jinja(t, image_token, tokenizer) == chat_template:
                return name
        except ValueError:
            continue
    return None


def _works_as_tokenizer_template(tokenizer, chat: str | None, image_token: str) -> bool:
    """Whether vlmkit's `tokenizer` template can use `chat` (string contents, growing prefixes)."""
    from ..data.conversation import TokenizerTemplate

    if not chat or getattr(tokenizer, "chat_template", None) != chat:
        return False
    probe = [{"role": "user", "content": image_token + "\nprobe question"}, {"role": "assistant", "content": "probe"},
             {"role": "user", "content": "second question"}]
    try:
        text = "".join(t for t, _ in TokenizerTemplate().segments(probe, True, tokenizer))
    except Exception:
        return False
    return all(s in text for s in (image_token, "probe question", "second question"))


def resolve_template(path: str, proc_cfg: dict, image_token: str, tokenizer) -> str:
    """The vlmkit template of a checkpoint's chat template: a registered one whose rendering it is (an export's),
    else `tokenizer` when it renders plain-string messages as growing prefixes, else vicuna_v1 with a warning."""
    chat = _read_text(path, "chat_template.jinja") or proc_cfg.get("chat_template") or \
        (_read_json(path, "chat_template.json") or {}).get("chat_template")
    template = infer_template(chat, image_token, tokenizer)
    if template is None:
        if _works_as_tokenizer_template(tokenizer, chat, image_token):
            template = "tokenizer"
        else:
            logger.warning("%s: chat template not recognised; using vicuna_v1. Pass template= to choose.", path)
            template = "vicuna_v1"
    return template


def import_token_ids(path: str, llm, tokenizer) -> None:
    """The checkpoint's generation settings into the imported LLM (its config, which vlmkit saves, and its
    generation config): `generation_config.json` where there is one (an export's holds the tokenizer's ids),
    else the text config's. A checkpoint whose EOS is not the tokenizer's gets a warning: vlmkit's `generate`
    stops at the tokenizer's."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        gen = None
    if gen is not None:
        for k in TOKEN_KEYS:
            if getattr(gen, k, None) is not None:
                setattr(llm.config, k, getattr(gen, k))
        llm.generation_config = gen
    eos = llm.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None and eos != [None] and tokenizer.eos_token_id not in eos:
        logger.warning("%s: eos_token_id %s in the checkpoint, but the tokenizer's EOS %r is %d; vlmkit's generate "
                       "stops at the tokenizer's", path, eos, tokenizer.eos_token, tokenizer.eos_token_id)


def import_llava(path: str | os.PathLike, template: str | None = None, image_aspect: str | None = None,
                 dtype: torch.dtype | None = None):
    """A transformers-native Llava or LlavaNext checkpoint (folder or hub id) -> a vlmkit VLM ready to fine-tune.

    LlavaNext becomes AnyRes tiling (its image_grid_pinpoints, unpad, image_newline).

    template: a registered template name, or None to infer it from the checkpoint's chat template
    (one written by `export_llava`; otherwise `tokenizer` when the checkpoint's template renders plain-string
    messages as growing prefixes, else vicuna_v1 with a warning). image_aspect: pad | resize, or None to read it from the image processor.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration)

    from ..config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig
    from ..encoders import VisionEncoder
    from ..llm import load_tokenizer
    from ..model import VLM
    from ..registry import CONNECTORS

    path = str(path)
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in ("llava", "llava_next"):
        raise ValueError(f"{path}: model_type {cfg.model_type!r}; import_llava reads LlavaForConditionalGeneration "
                         "and LlavaNextForConditionalGeneration checkpoints (model_type 'llava' / 'llava_next'); "
                         "import_model reads InternVL too")
    next_ = cfg.model_type == "llava_next"
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

    proc_cfg = _read_json(path, "processor_config.json") or {}
    # transformers 5 nests the image processor in processor_config.json; older checkpoints have preprocessor_config.json
    pre = proc_cfg.get("image_processor") or _read_json(path, "preprocessor_config.json") or {}
    image_size = cfg.vision_config.image_size
    if image_aspect is None and next_:
        image_aspect = "pad"  # AnyRes tiles are square: the aspect mode does not act on them
    if image_aspect is None:
        if pre.get("do_pad"):
            image_aspect = "pad"
        elif pre.get("do_center_crop") and "shortest_edge" in (pre.get("size") or {}):
            # e.g. llava-hf/llava-1.5: shortest-edge resize + centre crop, which vlmkit has no mode for;
            # LLaVA-1.5 itself was trained with pad
            logger.warning("%s: the image processor resizes the shortest edge and crops the centre; vlmkit "
                           "uses 'pad' (as LLaVA-1.5 trained). Pass image_aspect= to choose.", path)
            image_aspect = "pad"
        else:
            image_aspect = "resize"
    mean, std = pre.get("image_mean"), pre.get("image_std")

    image_token = proc_cfg.get("image_token", "<image>")
    tokenizer = load_tokenizer(path, image_token)
    if tokenizer.convert_tokens_to_ids(image_token) != cfg.image_token_id:
        raise ValueError(f"{path}: image token {image_token!r} has id {tokenizer.convert_tokens_to_ids(image_token)} "
                         f"in the tokenizer but image_token_id {cfg.image_token_id} in the config")
    if template is None:
        template = resolve_template(path, proc_cfg, image_token, tokenizer)

    llava = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration).from_pretrained(
        path, dtype=dtype)
    tiling = (TilingConfig(mode="anyres", grid_pinpoints=[list(map(int, p)) for p in cfg.image_grid_pinpoints])
              if next_ else TilingConfig())
    vision_config, text_config = llava.config.vision_config, llava.config.text_config
    mc = ModelConfig(
        encoder=EncoderConfig(name=kind, config=vision_config.to_dict(), feature_layer=cfg.vision_feature_layer,
                              image_aspect=image_aspect, image_size=image_size,
                              image_mean=list(mean) if mean else None, image_std=list(std) if std else None),
        connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(config=text_config.to_dict(), tokenizer=path, image_token=image_token),
        template=template, tiling=tiling,
    )
    with init_empty_weights(include_buffers=False):
        encoder = VisionEncoder(kind, llava.model.vision_tower, mc.encoder.feature_layer, image_size, mean, std)
        llm = AutoModelForCausalLM.from_config(text_config)
        connector = CONNECTORS.get("mlp2x_gelu")(encoder.out_dim, text_config.hidden_size)
        model = VLM(mc, encoder, connector, llm, tokenizer)
    if model.image_token_id != cfg.image_token_id:
        raise ValueError(f"{path}: image token id mismatch ({model.image_token_id} vs {cfg.image_token_id})")
    state = {k: v for k, v in llava.state_dict().items() if not k.startswith("model.vision_tower.")}
    state = from_llava_state(state, llm)
    model.assign_weights(state, f"{path}: weights do not fit vlmkit's VLM")
    import_token_ids(path, llm, tokenizer)
    if dtype is not None:
        model.to(dtype)
    return model


def import_model(path: str | os.PathLike, template: str | None = None, image_aspect: str | None = None,
                 dtype: torch.dtype | None = None):
    """A transformers-native Llava, LlavaNext or InternVL checkpoint (folder or hub id) -> a vlmkit VLM.

    Picks the reader by config.json's model_type; `image_aspect` applies to Llava only (the tiled
    models' tiles are square)."""
    from transformers import AutoConfig

    mt = AutoConfig.from_pretrained(str(path)).model_type
    if mt == "internvl":
        from .internvl import import_internvl

        return import_internvl(path, template=template, dtype=dtype)
    if mt in ("llava", "llava_next"):
        return import_llava(path, template=template, image_aspect=image_aspect, dtype=dtype)
    raise ValueError(f"{path}: model_type {mt!r}; vlmkit imports {', '.join(EXPORT_TYPES.values())} checkpoints")
