"""A VLM as a folder, and the one atomic folder writer.

The folder: config.json (every part's config, so no hub access is needed to rebuild; the LoRA adapters'
subfolders), model.safetensors (all weights under encoder.*, connector.*, llm.*, image_newline), the tokenizer
files and adapters/<component>/ (peft's adapter_config.json + adapter_model.safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..config import to_dict
from ..errors import disk_full, is_disk_full, load_file
from ..extras import require
from ..version import __version__
from .distributed import param_id, whole
from .lora import ADAPTER_WEIGHTS, load_adapters

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new files, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Make the folder `path` appear whole or not at all: `write(tmp)` fills a temporary `.<name>.*` sibling
    (which readers ignore), every file in it is fsynced, then it replaces `path` by renames.
    A full disk leaves what was there before untouched and raises DiskFullError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        fsync_dir(path.parent)  # the rename itself survives a power loss
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # what was there before is untouched: only the temporary folder is gone
            raise disk_full(e, path, "nothing already saved was changed") from e
        raise


def save_pretrained(model, path: str | os.PathLike, extra_files: dict | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write config, weights, adapters and tokenizer through `write_folder`.

    `extra_files`: file name -> function writing that file (given its path) into the temporary folder,
    so that it appears together with the model or not at all (a training checkpoint's state).
    `weights`: the weights to write instead of the module's own (a state dict gathered from ZeRO-3 / FSDP
    shards, where the module itself holds only its part).
    """
    def write(tmp: Path) -> None:
        adapters = _save_adapters(model, tmp)
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump({"vlmkit_version": __version__, "model": to_dict(saved_config(model)), "adapters": adapters},
                      f, indent=2)
        save_file(state_to_save(model, weights), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(str(tmp))
        for name, write_file in (extra_files or {}).items():
            write_file(tmp / name)

    write_folder(path, write)


def saved_config(model):
    """The ModelConfig a folder records: the parts' transformers configs inline, no hub paths."""
    return replace(
        model.config,
        encoder=model.encoder.saved_config(model.config.encoder),  # transformers config(s) inline
        # a 4-bit LLM is saved dequantized (see state_to_save): the folder holds a plain model
        llm=replace(model.config.llm, path=None, tokenizer=".", quantization=None,
                    config={k: v for k, v in model.llm.config.to_dict().items() if k != "quantization_config"}),
    )


def _save_adapters(model, folder: Path) -> dict[str, str]:
    """Each LoRA adapter in peft's PeftModel layout under adapters/<component>/; returns component -> subfolder."""
    adapters = {}
    for name, lora in model.adapters.items():
        from peft import get_peft_model_state_dict

        d = folder / "adapters" / name
        d.mkdir(parents=True)
        lora.peft_config["default"].save_pretrained(str(d))
        # peft's PeftModel layout: keys under base_model.model.<component's own names>
        state = {f"base_model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(lora).items()}
        save_file(state, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        adapters[name] = f"adapters/{name}"
    return adapters


def state_to_save(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All weights once: a tied target (lm_head sharing embed_tokens) is left out and re-tied on load.
    `state`: a full state dict gathered elsewhere (its tensors are copies: ties are read off the module)."""
    tied = getattr(model.llm, "_tied_weights_keys", None) or {}
    tied = tied.items() if isinstance(tied, dict) else ()
    if state is not None:
        own = dict(model.named_parameters(remove_duplicate=False))
        state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
        for target, source in tied:
            t, s = own.get(f"llm.{target}"), own.get(f"llm.{source}")
            if t is not None and t is s:
                state.pop(f"llm.{target}", None)
        return {k: v.detach().contiguous() for k, v in state.items()}
    state = model.state_dict()
    for name, m in model.named_modules():  # bitsandbytes 4-bit weights: saved dequantized (compute dtype)
        w = getattr(m, "weight", None)
        if type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None:
            dequantize_4bit = require("bitsandbytes.functional", "qlora", "saving a 4-bit LLM").dequantize_4bit
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.weight.")}
            state[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
    # LoRA-wrapped layers keep their base weight as `<layer>.base_layer.weight`: save the plain names
    state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    for target, source in tied:
        t, s = state.get(f"llm.{target}"), state.get(f"llm.{source}")
        if t is not None and s is not None and t.data_ptr() == s.data_ptr():
            del state[f"llm.{target}"]
    return {k: v.detach().contiguous() for k, v in state.items()}


def assign_weights(model, state: dict[str, torch.Tensor], what: str) -> None:
    """Put `state` into a model built on the meta device; re-tie tied weights; every parameter must be filled."""
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.llm.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_empty:
        raise ValueError(f"{what} (missing {still_empty[:5]}, unexpected {unexpected[:5]})")


def load_weights(model, path: str | os.PathLike) -> None:
    """Load the weights (and LoRA adapters) of a folder written by `save_pretrained` into `model`, in place:
    how a run resumes from a checkpoint or a finished stage. Adapters saved there and not yet on the model
    are added with their saved LoRA config. 4-bit (bitsandbytes) base weights are frozen and stay as loaded
    (the folder holds them dequantized)."""
    path = Path(path)
    with open(path / CONFIG_NAME) as f:
        saved = json.load(f)
    extra = set(model.adapters) - set(saved.get("adapters", {}))
    if extra:
        raise ValueError(f"{path}: the model has LoRA adapters on {sorted(extra)}, the folder has none there")
    load_adapters(model, path, saved.get("adapters", {}))
    own = model.state_dict(keep_vars=True)
    plain = {k.replace(".base_layer.", "."): k for k in own if "lora_" not in k}  # saved name -> own name
    quant = {f"{n}.weight".replace(".base_layer.", ".") for n, m in model.named_modules()
             if type(getattr(m, "weight", None)).__name__ == "Params4bit"}
    state = load_file(str(path / WEIGHTS_NAME))
    unexpected = [k for k in state if k not in plain and k not in quant]
    mapped = {plain[k]: v for k, v in state.items() if k in plain and k not in quant}
    loaded = {param_id(own[k]) for k in mapped}
    missing = [k for k in plain.values() if k not in mapped and param_id(own[k]) not in loaded  # tied
               and not any(k.replace(".base_layer.", ".").startswith(q) for q in quant)]
    if unexpected or missing:
        raise ValueError(f"{path / WEIGHTS_NAME}: weights do not match this model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for k, v in mapped.items():  # the same order on every process (the file's)
            with whole(own[k]):
                own[k].copy_(v)
