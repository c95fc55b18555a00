"""What a model folder may make vlmkit do: read it, never run code from it unless the user asks.

transformers runs Python files shipped with a checkpoint when `trust_remote_code` is on and the folder maps a
class to one (`auto_map` in config.json / tokenizer_config.json). vlmkit's own folders save the run's
`llm.trust_remote_code` / `encoder.trust_remote_code`, so a folder could switch it on for whoever loads it. Here
the folder's flags are never read: `read_model_folder` sets them to the user's choice for this load (the
`--trust-remote-code` flag, `trust_remote_code=True`, or the user's own run config), and a folder that asks for
code without that choice is refused with a message saying how to opt in.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, ModelConfig, from_dict

CONFIG_NAME = "config.json"
CODE_FILES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""Files next to config.json whose `auto_map` makes transformers import a module of the folder."""


class RemoteCodeRefused(PermissionError):
    """A model folder that needs to run its own Python code, loaded without the user's opt-in."""


def read_json_file(path: Path, what: str = "") -> dict:
    """A JSON object from `path`; errors name the file (and the line for text that does not parse)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found{f' ({what})' if what else ''}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} (a damaged or "
                         f"hand-edited file?)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _auto_map_reasons(where: str, data) -> list[str]:
    amap = data.get("auto_map") if isinstance(data, dict) else None
    if not amap:
        return []
    refs = []
    for key, value in (amap.items() if isinstance(amap, dict) else []):
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if ref:
                refs.append(f"{key} -> {ref}")
    return [f"{where} maps {', '.join(refs) or 'auto_map'} to code"]


def remote_code_reasons(folder: Path, saved_model: dict) -> list[str]:
    """Why loading `folder` would run code it ships: `auto_map` entries of its tokenizer / processor files and of
    the LLM and encoder configs saved inline in config.json."""
    reasons = []
    for name in CODE_FILES:
        p = folder / name
        if p.is_file():
            try:
                reasons += _auto_map_reasons(name, json.loads(p.read_text(encoding="utf-8-sig")))
            except (OSError, ValueError):
                reasons.append(f"{name} cannot be read (refused rather than guessed)")
    llm = saved_model.get("llm") or {}
    reasons += _auto_map_reasons("config.json model.llm.config", llm.get("config"))
    encs = [("encoder", saved_model.get("encoder") or {})]
    encs += [(f"encoder.members[{i}]", m) for i, m in enumerate((saved_model.get("encoder") or {}).get("members") or [])
             if isinstance(m, dict)]
    for where, enc in encs:
        reasons += _auto_map_reasons(f"config.json model.{where}.config", enc.get("config"))
    return reasons


def set_trust(config: ModelConfig, trust: bool) -> None:
    """The user's choice on every part (the folder's own flags are overwritten, never read)."""
    config.llm.trust_remote_code = bool(trust)
    config.encoder.trust_remote_code = bool(trust)
    for m in getattr(config.encoder, "members", None) or []:  # a FusedEncoderConfig's
        m.trust_remote_code = bool(trust)


def user_trusts(config: ModelConfig) -> bool:
    """Whether a model config (the user's own run config) opts in to remote code anywhere."""
    return bool(config.llm.trust_remote_code or config.encoder.trust_remote_code
                or any(m.trust_remote_code for m in getattr(config.encoder, "members", None) or []))


def read_model_folder(path, trust_remote_code: bool = False) -> tuple[dict, ModelConfig]:
    """(config.json's contents, its ModelConfig) of a vlmkit model folder, with remote code set to the user's
    `trust_remote_code` whatever the folder says. Raises RemoteCodeRefused when the folder ships code to run and
    the user has not opted in; errors in config.json name the file and the field."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    saved = read_json_file(cfg_file, "a vlmkit model folder has one")
    model = saved.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{cfg_file}: no `model` section (not a vlmkit model folder? an exported transformers "
                         f"model is loaded with `vlmkit import` first)")
    try:
        config = from_dict(ModelConfig, model, "model")
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    reasons = remote_code_reasons(path, model)
    if reasons and not trust_remote_code:
        raise RemoteCodeRefused(
            f"{path} ships Python code that loading it would run ({'; '.join(reasons)}). vlmkit never runs a model "
            f"folder's code unless you ask, for that run (the folder's own config.json cannot switch it on): if you "
            f"trust the folder's author, add --trust-remote-code to the command (Python: "
            f"VLM.from_pretrained(path, trust_remote_code=True))")
    set_trust(config, trust_remote_code)
    return saved, config


def no_prompt_for_remote_code() -> None:
    """transformers asks on stdin before running a checkpoint's code when trust_remote_code is left unset; a
    command-line run answers no instead (every vlmkit call passes it explicitly; this covers any that does not)."""
    try:
        import transformers.dynamic_module_utils as dmu
    except ImportError:  # pragma: no cover
        return
    dmu.TIME_OUT_REMOTE_CODE = 0
