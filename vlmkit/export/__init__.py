"""Export to transformers-native models (and import them back): the dispatcher, the one place that knows
every target.

    export_model(model_or_dir, out_dir)   picks the target from the model's parts (`export_target`):
        CLIP / SigLIP + mlp2x_gelu, no tiling            -> LlavaForConditionalGeneration      (llava.py)
        CLIP / SigLIP + mlp2x_gelu + AnyRes (unpad)      -> LlavaNextForConditionalGeneration  (llava.py)
        the same + model.video (pool average / max)      -> LlavaNextVideoForConditionalGeneration (video.py)
        the same (+ anyres_max) + model.video (pool bilinear, newline video)
                                                         -> LlavaOnevisionForConditionalGeneration (onevision.py)
        InternViT + pixel_shuffle (+ internvl tiling)    -> InternVLForConditionalGeneration   (internvl.py)
    import_model(dir_or_hub_id)           a Llava / LlavaNext / InternVL checkpoint -> VLM, to fine-tune it with vlmkit

Each export writes a folder that AutoModelForImageTextToText / AutoProcessor (and so vLLM, SGLang) load
without vlmkit. A combination no native class can hold raises ValueError naming the part and the reason: the
dispatcher sends the model to the target its parts point at, and that target's checks refuse what it cannot hold.

    common.py     what every target shares (weight names, chat template, token ids, folder writing, model card)
    llava.py      Llava and LlavaNext: checks, processor, config, export, import
    internvl.py   InternVL: checks, frame tokens, processor, config, export, import
    video.py      LlavaNextVideo (a model with model.video): checks, processor files, config, export (builds on
                  llava.py's LlavaNext image side)
    onevision.py  LlavaOnevision (video pool bilinear, newline video, anyres_max): checks, processor files,
                  config, export (over llava.py's AnyRes checks and video.py's shared video checks)

A new target is a file importing `common` (checks, `NATIVE_CLASSES`, `write_<target>`, `import_<target>`),
registered here: in `EXPORT_TYPES`, `export_target`, `export_model` and `import_model`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import internvl, llava, onevision, video
from .common import (EXPORT_TYPES, TOKEN_KEYS, WHY_NOT_CONNECTOR, build_native, check_llm, exported_token_ids,
                     from_llava_state, import_token_ids, infer_template, model_card, prepare, resolve_template,
                     template_to_jinja, text_config_of, to_llava_state, write_export)
from .internvl import check_internvl_exportable, export_internvl, import_internvl
from .video import check_llava_next_video_exportable, export_llava_next_video
from .onevision import check_llava_onevision_exportable, export_llava_onevision
from .llava import (LLAVA_VISION_TYPES, VISION_TYPE_TO_KIND, check_exportable, check_llava_next_exportable,
                    check_llava_parts, export_llava, export_llava_next, import_llava, llava_config,
                    llava_image_processor, llava_next_config, llava_next_image_processor, llava_next_processor,
                    llava_processor)

EXPORT_TYPES.update(llava.NATIVE_CLASSES)  # model_type -> transformers class, every target's
EXPORT_TYPES.update(internvl.NATIVE_CLASSES)
EXPORT_TYPES.update(video.NATIVE_CLASSES)
EXPORT_TYPES.update(onevision.NATIVE_CLASSES)


def export_target(model) -> str:
    """The native class family a model exports to: llava | llava_next | internvl | llava_next_video |
    llava_onevision (a model with model.video: pool average / max -> LlavaNextVideo, else LlavaOnevision, whose
    checks name the setting that does not map)."""
    v = getattr(model.config, "video", None)
    if v is not None:
        return "llava_next_video" if v.pool in ("average", "max") else "llava_onevision"
    mode = getattr(getattr(model.config, "tiling", None), "mode", "none")
    if model.encoder.kind == "internvit" or model.config.connector.name == "pixel_shuffle" or mode == "internvl":
        return "internvl"  # its checks name the part that does not fit
    return "llava_next" if mode == "anyres" else "llava"


_WRITERS = {"llava": llava.write_llava, "llava_next": llava.write_llava_next, "internvl": internvl.write_internvl,
            "llava_next_video": video.write_llava_next_video, "llava_onevision": onevision.write_llava_onevision}


def export_model(model_or_dir, out_dir, template: str | None = None) -> Path:
    """Export to the native class the model's parts fit (see `export_target`); a clear error when none does.
    Returns the folder written."""
    model, src = prepare(model_or_dir)
    return _WRITERS[export_target(model)](model, src, out_dir, template)


def import_model(path: str | os.PathLike, template: str | None = None, image_aspect: str | None = None,
                 dtype: torch.dtype | None = None):
    """A transformers-native Llava, LlavaNext or InternVL checkpoint (folder or hub id) -> a vlmkit VLM.

    Picks the reader by config.json's model_type; `image_aspect` applies to Llava only (the tiled
    models' tiles are square)."""
    from transformers import AutoConfig

    mt = AutoConfig.from_pretrained(str(path)).model_type
    if mt in internvl.NATIVE_CLASSES:
        return import_internvl(path, template=template, dtype=dtype)
    if mt in llava.NATIVE_CLASSES:
        return import_llava(path, template=template, image_aspect=image_aspect, dtype=dtype)
    raise ValueError(f"{path}: model_type {mt!r}; vlmkit imports {', '.join(EXPORT_TYPES.values())} checkpoints")


__all__ = [
    # the dispatcher
    "EXPORT_TYPES", "export_target", "export_model", "import_model",
    # targets
    "export_llava", "export_llava_next", "import_llava", "export_internvl", "import_internvl",
    "export_llava_next_video", "check_llava_next_video_exportable", "export_llava_onevision",
    "check_llava_onevision_exportable",
    "check_exportable", "check_llava_parts", "check_llava_next_exportable", "check_internvl_exportable",
    "LLAVA_VISION_TYPES", "VISION_TYPE_TO_KIND", "llava_config", "llava_next_config", "llava_image_processor",
    "llava_processor", "llava_next_image_processor", "llava_next_processor",
    # the shared toolkit
    "WHY_NOT_CONNECTOR", "TOKEN_KEYS", "check_llm", "to_llava_state", "from_llava_state", "text_config_of",
    "template_to_jinja", "infer_template", "resolve_template", "exported_token_ids", "build_native",
    "import_token_ids", "write_export", "model_card",
]
