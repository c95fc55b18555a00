"""Optional parts: which pip extra brings which package, and one clear error when it is missing.

`require("av", "video", "reading videos")` returns the imported module, or raises `MissingExtra` (an ImportError)
whose message names the feature, the package and the install command. The extras are declared in pyproject.toml.
"""
from __future__ import annotations

import importlib
import importlib.util

EXTRAS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "plots": ("matplotlib", "matplotlib"),
    "video": ("av", "av"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "qlora": ("bitsandbytes", "bitsandbytes"),
}
"""extra name -> (import name, pip package)."""


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


def available(module: str) -> bool:
    """True when `module` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str | None, feature: str):
    """The imported `module`, or MissingExtra naming `feature`, the package and `pip install 'vlmkit[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = EXTRAS.get(extra, (module, module))[1] if extra else module
        how = f"pip install 'vlmkit[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        raise MissingExtra(f"{feature} needs the {package} package, which is not installed ({e}): {how}") from None
