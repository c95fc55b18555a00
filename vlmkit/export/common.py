"""What every export target shares: the toolkit `llava.py` and `internvl.py` are built from.

Knows no target (vlmkit.export, the package, is the one place that knows them all and fills `EXPORT_TYPES`):

    weights      to_llava_state / from_llava_state: vlmkit names <-> transformers 5 names (same tensors, no copies)
    checks       check_llm, WHY_NOT_CONNECTOR: the refusals every target shares
    chat         template_to_jinja (export), resolve_template / infer_template (import)
    token ids    exported_token_ids, build_native (export), import_token_ids (import): bos / eos / pad from the
                 tokenizer the model was trained with
    folders      prepare (load a folder, merge LoRA), write_export (temporary folder, fsync, move into place)
    model card   model_card (README.md of an export)
    import       read_processor_config, load_checked_tokenizer, empty_vlm, fill_weights: the steps every reader takes

Weight names (transformers 5):

    vlmkit                          Llava / LlavaNext / InternVL
    encoder.model.X              -> model.vision_tower.X
    connector.X                  -> model.multi_modal_projector.X
    image_newline                -> model.image_newline                 (LlavaNext)
    llm.<base_model_prefix>.X    -> model.language_model.X
    llm.<output embeddings>.*    -> lm_head.*

The chat template is a Jinja rendering of vlmkit's template that gives the same ids as
`encode(..., add_generation_prompt=True)`. The text config and generation_config.json hold the bos / eos / pad ids
of the tokenizer the model was trained with (where the LLM's config says otherwise, the tokenizer wins and the
export logs the change), so transformers' `generate` stops where vlmkit's does; `import` reads them back.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights

logger = logging.getLogger(__name__)

# model_type -> transformers class of every export target. Filled by vlmkit.export (the package), which imports
# the targets; write_export replaces only folders of these types, model_card names the class.
EXPORT_TYPES: dict[str, str] = {}


# connectors no native class holds, and why (the Llava family needs mlp2x_gelu, InternVL pixel_shuffle)
WHY_NOT_CONNECTOR = {
    "qformer": "a Q-Former belongs to BLIP-2 / InstructBLIP, whose vision tower, query tokens and LM wiring are "
               "their own; Llava, LlavaNext and InternVL feed every patch through an MLP projector",
    "perceiver_resampler": "a Perceiver resampler (learned latents cross-attending to the patches) has no place in "
                           "Llava, LlavaNext or InternVL, whose projectors map each patch (or 2x2 block) to a token",
    "avgpool_mlp": "average pooling before the MLP has no place in Llava, LlavaNext or InternVL: their projectors "
                   "see every patch (InternVL folds 2x2 blocks by pixel shuffle, not by averaging)",
}


# ---- checks ---------------------------------------------------------------------------------
def check_llm(model, target: str) -> None:
    llm = model.llm
    if getattr(llm.config, "final_logit_softcapping", None):
        raise ValueError(f"cannot export LLM {llm.config.model_type!r}: it soft-caps its logits "
                         f"(final_logit_softcapping), which {target}'s lm_head does not")


def llm_parts(llm) -> tuple[str, str]:
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
    prefix, head = llm_parts(model.llm)
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
    prefix, head = llm_parts(llm)
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


def text_config_of(llm):
    cfg = llm.config.__class__.from_dict(llm.config.to_dict())
    cfg._name_or_path = ""
    return cfg


# ---- chat templates -------------------------------------------------------------------------
def _lit(s: str) -> str:
    """A Jinja string literal."""
    return json.dumps(s)


def _content_macro(image_token: str, image_sep: str, video_token: str | None = None) -> str:
    """Message content as text: a string as is; a list of parts as its images, then its videos (with
    `video_token`), then its texts."""
    videos = ("" if video_token is None else
              "{%- for p in c if p['type'] == 'video' -%}{{ " + _lit(video_token + image_sep) + " }}{%- endfor -%}")
    return ("{%- macro render(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
            "{%- for p in c if p['type'] == 'image' -%}{{ " + _lit(image_token + image_sep) + " }}{%- endfor -%}"
            + videos +
            "{{ c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
            "{%- endif -%}{%- endmacro -%}")


def _with_bos(body: str, template, tokenizer, image_token: str, video_token: str | None = None) -> str:
    """`body` (Jinja) preceded by the BOS text `encode` puts in front (`conversation.bos_text`): the BOS token and,
    for a sentencepiece-style tokenizer, the space that gives the first word its prefix space as at the start of a
    string (none when the rendering starts with the image or the video token)."""
    from ..data.conversation import bos_glue

    if not (template.add_bos and tokenizer is not None and tokenizer.bos_token):
        return body
    glue = bos_glue(tokenizer)
    if not glue:
        return "{{ bos_token }}" + body
    starts = " or ".join(f"body.startswith({_lit(t)})" for t in (image_token, video_token) if t)
    return ("{%- set body -%}" + body + "{%- endset -%}{{ bos_token }}"
            "{%- if body and not (" + starts + ") -%}{{ " + _lit(glue) + " }}{%- endif -%}"
            "{{ body }}")


def template_to_jinja(template, image_token: str = "<image>", tokenizer=None, video_token: str | None = None) -> str:
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
        return _content_macro(image_token, "\n", video_token) + _with_bos(
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
            "{%- endif -%}{%- endfor -%}", t, tokenizer, image_token, video_token)
    if isinstance(template, PlainTemplate):
        # the image placeholders of the first user turn, then its video ones, then the first answer and a newline
        return _content_macro(image_token, "", video_token) + _with_bos(
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
            "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
            "{%- if users -%}{%- set c = users[0]['content'] -%}"
            "{%- if c is string -%}" + "".join("{{ " + _lit(t) + " * (c.split(" + _lit(t) + ") | length - 1) }}"
                                               for t in (image_token, video_token) if t) +
            "{%- else -%}{{ render(c | rejectattr('type', 'equalto', 'text') | list) }}{%- endif -%}{%- endif -%}"
            "{%- if answers -%}{{ render(answers[0]['content']) + '\\n' }}{%- endif -%}", template, tokenizer,
            image_token, video_token)
    raise ValueError(f"template {getattr(template, 'name', template)!r} has no Jinja equivalent")


# ---- token ids ------------------------------------------------------------------------------
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


# ---- folders --------------------------------------------------------------------------------
def _load(model_or_dir):
    from ..models.vlm import VLM

    if isinstance(model_or_dir, VLM):
        return model_or_dir, None
    from ..models.build import resolve_model_dir

    path = resolve_model_dir(model_or_dir)
    return VLM.from_pretrained(path), path


def prepare(model_or_dir):
    """(model, source folder or None) with LoRA adapters merged (only into a model loaded here)."""
    model, src = _load(model_or_dir)
    if getattr(model, "adapters", None):
        if src is None:
            raise ValueError(f"the model has LoRA adapters on {sorted(model.adapters)}: call model.merge_lora() "
                             "first (export does not change the model it is given), or export its saved folder")
        model.merge_lora()  # a model loaded here: fold the adapters into the weights the native class will hold
    return model, src


def _is_export_dir(path: Path) -> bool:
    """A folder a previous export wrote (replaced by a new export; anything else is not)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in EXPORT_TYPES
    except (OSError, ValueError):
        return False


def write_export(out_dir, hf_model, save_processor, card: str) -> Path:
    """Model + processor (`save_processor(folder)`) + README.md, written through vlmkit's one atomic folder writer
    (`models.serialization.write_folder`: a temporary folder, fsynced, then renamed into place), replacing a
    previous export at `out_dir` and nothing else."""
    from ..models.serialization import write_folder

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not _is_export_dir(out):
        raise FileExistsError(f"{out} exists and is not a Llava / LlavaNext / InternVL export; refusing to replace it")

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        save_processor(tmp)
        (tmp / "README.md").write_text(card)

    write_folder(out, write)
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


def model_card(model, cfg, template: str, src: Path | None, notes=(), title: str = "") -> str:
    """README.md of an export: the parts, features, preprocessing, template, usage and the run's metrics.
    `notes`: extra bullet lines (tiling, known differences); `title`: the family in the heading ("LLaVA-style")."""
    e, llm = model.encoder, model.llm
    ec, lc = e.model.config, llm.config
    cls = EXPORT_TYPES.get(cfg.model_type, type(cfg).__name__)
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
def read_json(path: str, name: str) -> dict | None:
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
        (read_json(path, "chat_template.json") or {}).get("chat_template")
    template = infer_template(chat, image_token, tokenizer)
    if template is None:
        if _works_as_tokenizer_template(tokenizer, chat, image_token):
            template = "tokenizer"
        else:
            logger.warning("%s: chat template not recognised; using vicuna_v1. Pass template= to choose.", path)
            template = "vicuna_v1"
    return template


def read_processor_config(path: str) -> tuple[dict, dict]:
    """(processor_config.json, the image processor's settings) of a checkpoint: transformers 5 nests the image
    processor in processor_config.json; older checkpoints have preprocessor_config.json."""
    proc_cfg = read_json(path, "processor_config.json") or {}
    return proc_cfg, proc_cfg.get("image_processor") or read_json(path, "preprocessor_config.json") or {}


def load_checked_tokenizer(path: str, image_token: str, image_token_id: int, what: str = "image token"):
    """The checkpoint's tokenizer with `image_token` (`what` names it in the error), which must have the config's
    image_token_id."""
    from ..models.llm import load_tokenizer

    tokenizer = load_tokenizer(path, image_token)
    if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
        raise ValueError(f"{path}: {what} {image_token!r} has id {tokenizer.convert_tokens_to_ids(image_token)} "
                         f"in the tokenizer but image_token_id {image_token_id} in the config")
    return tokenizer


def empty_vlm(mc, vision_tower, text_config, tokenizer, mean, std):
    """The VLM that `mc` describes around a checkpoint's vision tower (its loaded weights kept), the LLM and the
    connector (`mc.connector.options` its arguments) built empty for `fill_weights`."""
    from transformers import AutoModelForCausalLM

    from ..models.encoders import VisionEncoder
    from ..models.vlm import VLM
    from ..registry import CONNECTORS

    e = mc.encoder
    with init_empty_weights(include_buffers=False):
        encoder = VisionEncoder(e.name, vision_tower, e.feature_layer, e.image_size, mean, std)
        llm = AutoModelForCausalLM.from_config(text_config)
        connector = CONNECTORS.get(mc.connector.name)(encoder.out_dim, text_config.hidden_size,
                                                       **mc.connector.options)
        return VLM(mc, encoder, connector, llm, tokenizer)


def fill_weights(model, native, path: str, dtype: torch.dtype | None = None):
    """`model` (from `empty_vlm`) given the native checkpoint's weights (the projector, image_newline, the LLM:
    assigned, not copied; the vision tower is the checkpoint's already) and its generation settings; then `dtype`."""
    state = {k: v for k, v in native.state_dict().items() if not k.startswith("model.vision_tower.")}
    model.assign_weights(from_llava_state(state, model.llm), f"{path}: weights do not fit vlmkit's VLM")
    import_token_ids(path, model.llm, model.tokenizer)
    if dtype is not None:
        model.to(dtype)
    return model
