"""Export to transformers-native `LlavaForConditionalGeneration` (and import back).

    export_llava(model_or_dir, out_dir)   vlmkit VLM (CLIP / SigLIP + mlp2x_gelu + any causal LM) -> a folder
                                          that AutoModelForImageTextToText / AutoProcessor (and so vLLM,
                                          SGLang) load without vlmkit
    import_llava(dir_or_hub_id)           a Llava checkpoint -> VLM, to fine-tune it with vlmkit

Weight names (transformers 5):

    vlmkit                          Llava
    encoder.model.X              -> model.vision_tower.X
    connector.linear_{1,2}.*     -> model.multi_modal_projector.linear_{1,2}.*
    llm.<base_model_prefix>.X    -> model.language_model.X
    llm.<output embeddings>.*    -> lm_head.*

The exported processor reproduces vlmkit's preprocessing (pad to a square with the mean colour,
bicubic resize, normalise) with `LlavaImageProcessor`, and its chat template is a Jinja rendering
of vlmkit's template that gives the same ids as `encode(..., add_generation_prompt=True)`.
A combination no native class can hold raises ValueError naming the part and the reason.
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
}


# ---- checks ---------------------------------------------------------------------------------
def check_exportable(model) -> None:
    """Raise ValueError with the reason when `model` has no exact LlavaForConditionalGeneration equivalent."""
    enc, conn, llm = model.encoder, model.connector, model.llm
    name = model.config.connector.name
    mode = getattr(getattr(model.config, "tiling", None), "mode", "none")
    if mode != "none":
        raise ValueError(f"cannot export {mode} tiling to Llava: LlavaForConditionalGeneration sees one tile per "
                         f"image (AnyRes belongs to LlavaNextForConditionalGeneration, not exported yet)")
    vt = enc.model.config.model_type
    if enc.kind not in LLAVA_VISION_TYPES:
        raise ValueError(f"cannot export encoder {enc.kind!r} ({vt}) with connector {name!r} to Llava: "
                         f"{_WHY_NOT.get(enc.kind, 'Llava accepts only CLIP / SigLIP vision towers')}")
    if vt not in LLAVA_VISION_TYPES[enc.kind]:
        why = ("SigLIP 2 NaFlex needs pixel_attention_mask and spatial_shapes, which Llava does not pass; "
               "use a fixed-resolution siglip_vision_model" if vt == "siglip2_vision_model" else
               f"Llava accepts only {', '.join(t for ts in LLAVA_VISION_TYPES.values() for t in ts)}")
        raise ValueError(f"cannot export vision model type {vt!r} to Llava: {why}")
    if enc.num_prefix_tokens not in (0, 1):
        raise ValueError(f"cannot export {enc.kind!r}: it drops {enc.num_prefix_tokens} prefix tokens, Llava's "
                         "vision_feature_select_strategy drops either none ('full') or one CLS token ('default')")
    if name != "mlp2x_gelu" or not hasattr(conn, "linear_1"):
        raise ValueError(f"cannot export connector {name!r} to Llava: LlavaMultiModalProjector is exactly "
                         "Linear -> GELU -> Linear (mlp2x_gelu)")
    if conn.linear_2 is None or len(conn.extra) or conn.linear_1.bias is None or conn.linear_2.bias is None:
        depth = 1 if conn.linear_2 is None else 2 + len(conn.extra)
        raise ValueError(f"cannot export mlp2x_gelu with depth {depth} to Llava: LlavaMultiModalProjector "
                         "has exactly two biased linear layers (depth 2)")
    if not isinstance(conn.act, torch.nn.GELU) or conn.act.approximate != "none":
        raise ValueError("cannot export the connector: Llava's projector_hidden_act 'gelu' is the exact GELU")
    if getattr(llm.config, "final_logit_softcapping", None):
        raise ValueError(f"cannot export LLM {llm.config.model_type!r}: it soft-caps its logits "
                         "(final_logit_softcapping), which LlavaForConditionalGeneration's lm_head does not")
    if not -(enc.model.config.num_hidden_layers + 1) <= enc.feature_layer <= enc.model.config.num_hidden_layers:
        raise ValueError(f"feature_layer {enc.feature_layer} cannot be expressed as vision_feature_layer")


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
    """vlmkit state dict -> transformers 5 Llava names (same tensors, no copies)."""
    prefix, head = _llm_parts(model.llm)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.model."):
            out["model.vision_tower." + k[len("encoder.model."):]] = v
        elif k.startswith("connector."):
            out["model.multi_modal_projector." + k[len("connector."):]] = v
        elif k.startswith(f"llm.{prefix}."):
            out["model.language_model." + k[len(f"llm.{prefix}."):]] = v
        elif k.startswith(f"llm.{head}."):
            out["lm_head." + k[len(f"llm.{head}."):]] = v
        else:
            raise ValueError(f"cannot export weight {k!r}: it has no place in LlavaForConditionalGeneration")
    return out


def from_llava_state(state: dict[str, torch.Tensor], llm) -> dict[str, torch.Tensor]:
    """The reverse of `to_llava_state`."""
    prefix, head = _llm_parts(llm)
    rules = [("model.vision_tower.", "encoder.model."), ("model.multi_modal_projector.", "connector."),
             ("model.language_model.", f"llm.{prefix}."), ("lm_head.", f"llm.{head}.")]
    out = {}
    for k, v in state.items():
        for src, dst in rules:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            raise ValueError(f"cannot import weight {k!r}: not a LlavaForConditionalGeneration weight vlmkit knows")
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


def template_to_jinja(template, image_token: str = "<image>", tokenizer=None) -> str:
    """A Jinja chat template rendering conversations as vlmkit's `template` does.

    For a prompt (`add_generation_prompt=True`) and for conversations ending with an answer, the
    text equals the concatenation of vlmkit's segments. A list content (`[{"type": "image"},
    {"type": "text", ...}]`) becomes `<image>\\n` per image, then the texts.
    """
    from .data.conversation import PlainTemplate, Template, TokenizerTemplate

    bos = "{{ bos_token }}" if template.add_bos and tokenizer is not None and tokenizer.bos_token else ""
    if isinstance(template, TokenizerTemplate):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
        return tokenizer.chat_template
    if isinstance(template, Template):
        t = template
        return (
            _content_macro(image_token, "\n") + bos +
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
            "{%- endif -%}{%- endfor -%}"
        )
    if isinstance(template, PlainTemplate):
        # image placeholders of the first user turn, then the first answer and a newline
        return (
            _content_macro(image_token, "") + bos +
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
            "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
            "{%- if users -%}{%- set c = users[0]['content'] -%}"
            "{%- if c is string -%}{{ " + _lit(image_token) + " * (c.split(" + _lit(image_token) + ") | length - 1) }}"
            "{%- else -%}{{ render(c | selectattr('type', 'equalto', 'image') | list) }}{%- endif -%}{%- endif -%}"
            "{%- if answers -%}{{ render(answers[0]['content']) + '\\n' }}{%- endif -%}"
        )
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

    from .data.conversation import get_template

    tok = model.tokenizer
    chat = template_to_jinja(get_template(template or model.config.template), model.config.llm.image_token, tok)
    return LlavaProcessor(image_processor=llava_image_processor(model), tokenizer=tok,
                          patch_size=model.encoder.patch_size,
                          vision_feature_select_strategy="default" if model.encoder.num_prefix_tokens else "full",
                          num_additional_image_tokens=model.encoder.num_prefix_tokens,
                          chat_template=chat, image_token=model.config.llm.image_token)


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


# ---- export ---------------------------------------------------------------------------------
def _load(model_or_dir):
    from .model import VLM

    if isinstance(model_or_dir, VLM):
        return model_or_dir, None
    from .model import resolve_model_dir

    path = resolve_model_dir(model_or_dir)
    return VLM.from_pretrained(path), path


def _is_llava_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def export_llava(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Write a transformers-native Llava checkpoint (weights, config, processor, chat template, model card)."""
    from transformers import LlavaForConditionalGeneration

    model, src = _load(model_or_dir)
    if getattr(model, "adapters", None):
        if src is None:
            raise ValueError(f"the model has LoRA adapters on {sorted(model.adapters)}: call model.merge_lora() "
                             "first (export does not change the model it is given), or export its saved folder")
        model.merge_lora()  # a model loaded here: fold the adapters into the weights Llava will hold
    check_exportable(model)
    cfg = llava_config(model)
    state = to_llava_state(model)
    state.update(_baked_vision_config_and_state(model)[1])
    with init_empty_weights(include_buffers=False):
        llava = LlavaForConditionalGeneration(cfg)
    _, unexpected = llava.load_state_dict(state, strict=False, assign=True)
    llava.tie_weights()
    still_empty = [n for n, p in llava.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        raise ValueError(f"vlmkit weights do not fit LlavaForConditionalGeneration: "
                         f"missing {still_empty[:5]}, unexpected {unexpected[:5]}")
    gen = model.llm.generation_config.__class__.from_dict(model.llm.generation_config.to_dict())
    tok = model.tokenizer
    for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                 ("pad_token_id", tok.pad_token_id)):
        if getattr(gen, k, None) is None and v is not None:
            setattr(gen, k, v)
    llava.generation_config = gen
    processor = llava_processor(model, template)

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not _is_llava_dir(out):
        raise FileExistsError(f"{out} exists and is not a Llava export; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        llava.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        # also the pre-v5 layout (preprocessor_config.json), read by older transformers and other loaders
        processor.image_processor.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(model, cfg, template or model.config.template, src))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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


def model_card(model, cfg, template: str, src: Path | None) -> str:
    e, llm = model.encoder, model.llm
    ec, lc = e.model.config, llm.config
    rows = [
        ("vision encoder", f"{e.kind} (`{ec.model_type}`): {ec.num_hidden_layers} layers, width {ec.hidden_size}, "
                           f"patch {e.patch_size}, input {e.image_size}px", _count(e)),
        ("connector", f"`{model.config.connector.name}`: Linear({e.out_dim}->{lc.hidden_size}) -> GELU -> "
                      f"Linear({lc.hidden_size}->{lc.hidden_size})", _count(model.connector)),
        ("language model", f"`{lc.model_type}`: {lc.num_hidden_layers} layers, width {lc.hidden_size}, "
                           f"vocabulary {lc.vocab_size}", _count(llm)),
    ]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llava, vlmkit]", "---", "",
        "# LLaVA-style vision-language model (exported from vlmkit)", "",
        "`LlavaForConditionalGeneration` checkpoint; loads with `AutoModelForImageTextToText` and `AutoProcessor` "
        "(no vlmkit needed).", "",
        "| part | what | parameters |", "|---|---|---|",
        *[f"| {a} | {b} | {_human(n)} |" for a, b, n in rows],
        f"| total | | {_human(sum(n for *_, n in rows))} |", "",
        f"- image features: hidden_states[{e.feature_layer}], select strategy "
        f"`{cfg.vision_feature_select_strategy}`, {e.num_tokens} tokens per image",
        f"- preprocessing: {'pad to a square with the mean colour, ' if model.config.encoder.image_aspect == 'pad' else ''}"
        f"bicubic resize to {e.image_size}x{e.image_size}, mean {list(e.mean)}, std {list(e.std)}",
        f"- chat template: `{template}`; image token `{model.config.llm.image_token}` (id {model.image_token_id})",
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
    from .data.conversation import TokenizerTemplate
    from .registry import TEMPLATES

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
    from .data.conversation import TokenizerTemplate

    if not chat or getattr(tokenizer, "chat_template", None) != chat:
        return False
    probe = [{"role": "user", "content": image_token + "\nprobe question"}, {"role": "assistant", "content": "probe"},
             {"role": "user", "content": "second question"}]
    try:
        text = "".join(t for t, _ in TokenizerTemplate().segments(probe, True, tokenizer))
    except Exception:
        return False
    return all(s in text for s in (image_token, "probe question", "second question"))


def import_llava(path: str | os.PathLike, template: str | None = None, image_aspect: str | None = None,
                 dtype: torch.dtype | None = None):
    """A transformers-native Llava checkpoint (folder or hub id) -> a vlmkit VLM ready to fine-tune.

    template: a registered template name, or None to infer it from the checkpoint's chat template
    (one written by `export_llava`; otherwise `tokenizer` when the checkpoint's template renders plain-string
    messages as growing prefixes, else vicuna_v1 with a warning). image_aspect: pad | resize, or None to read it from the image processor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    from .config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
    from .encoders import VisionEncoder
    from .llm import load_tokenizer
    from .model import VLM
    from .registry import CONNECTORS

    path = str(path)
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type != "llava":
        raise ValueError(f"{path}: model_type {cfg.model_type!r}; import_llava reads LlavaForConditionalGeneration "
                         "checkpoints (model_type 'llava')")
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
        chat = _read_text(path, "chat_template.jinja") or proc_cfg.get("chat_template") or \
            (_read_json(path, "chat_template.json") or {}).get("chat_template")
        template = infer_template(chat, image_token, tokenizer)
        if template is None:
            if _works_as_tokenizer_template(tokenizer, chat, image_token):
                template = "tokenizer"
            else:
                logger.warning("%s: chat template not recognised; using vicuna_v1. Pass template= to choose.", path)
                template = "vicuna_v1"

    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    vision_config, text_config = llava.config.vision_config, llava.config.text_config
    mc = ModelConfig(
        encoder=EncoderConfig(name=kind, config=vision_config.to_dict(), feature_layer=cfg.vision_feature_layer,
                              image_aspect=image_aspect, image_size=image_size,
                              image_mean=list(mean) if mean else None, image_std=list(std) if std else None),
        connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(config=text_config.to_dict(), tokenizer=path, image_token=image_token),
        template=template,
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
    if dtype is not None:
        model.to(dtype)
    return model
