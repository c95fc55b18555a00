"""LoRA adapters on a VLM's components (peft LoraModel, kept in `model.adapters`, not as submodules)."""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ..config import ComponentPlan
from ..errors import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_lora(model, name: str, plan, state: dict | None = None) -> None:
    """Wrap a component's Linear layers with peft LoRA adapters, in place (kept if already there)."""
    if name in model.adapters:
        return
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    target = model.components()[name]
    cfg = LoraConfig(r=plan.r, lora_alpha=plan.alpha, lora_dropout=plan.dropout,
                     target_modules=lora_targets(target, plan.target_modules))
    model.adapters[name] = LoraModel(target, cfg, "default")
    if state is not None:
        _set_state(model, name, state, name)


def merge_lora(model, name: str | None = None) -> None:
    """Fold adapters into the base weights: afterwards the component is a plain transformers model."""
    for n in [name] if name else list(model.adapters):
        model.adapters.pop(n).merge_and_unload()


def load_adapters(model, path: str | Path, adapters: dict[str, str]) -> None:
    """The adapters of a saved folder (`adapters`: component -> subfolder, from its config.json) onto `model`:
    an adapter already there takes the saved weights, a missing one is added with its saved LoRA config."""
    from peft import LoraConfig

    path = Path(path)
    for name, sub in adapters.items():
        state = {k.removeprefix("base_model."): v for k, v in load_file(str(path / sub / ADAPTER_WEIGHTS)).items()}
        if name in model.adapters:
            _set_state(model, name, state, f"{path}: {name}")
        else:
            lc = LoraConfig.from_pretrained(str(path / sub))
            add_lora(model, name, ComponentPlan(mode="lora", r=lc.r, alpha=lc.lora_alpha, dropout=lc.lora_dropout,
                                                target_modules=sorted(lc.target_modules)), state)


def _set_state(model, name: str, state: dict, what: str) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model.adapters[name], state)
    if res.unexpected_keys:
        raise ValueError(f"{what} adapter: unexpected keys {res.unexpected_keys[:5]}")


def lora_targets(module: nn.Module, targets) -> list[str]:
    """Names of the Linear layers a LoRA target spec selects (what peft will wrap)."""
    linear = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all-linear":
        out = getattr(module, "get_output_embeddings", lambda: None)()
        return [n for n, m in linear if m is not out]
    if isinstance(targets, str):
        return [n for n, _ in linear if re.fullmatch(targets, n)]
    return [n for n, _ in linear if any(n == t or n.endswith("." + t) for t in targets)]
