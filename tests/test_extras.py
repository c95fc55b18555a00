"""Optional parts are pip extras: pyproject.toml declares what vlmkit/extras.py names, and every import of an
optional package in vlmkit/ goes through `extras.require` (one clear message naming the extra when missing)."""
from __future__ import annotations

import ast
import pathlib
import re
import sys
import tomllib

import pytest

from vlmkit.extras import EXTRAS, MissingExtra, available, require

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL = {"matplotlib", "tensorboard", "wandb", "av", "deepspeed", "bitsandbytes"}


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def names(reqs) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_every_extra_is_declared_and_all_and_dev_hold_what_they_should():
    ex = extras()
    for extra, (_, package) in EXTRAS.items():
        assert names(ex[extra]) == {package}, extra
    assert set(ex["all"]) == {r for e in EXTRAS for r in ex[e]}
    assert set(ex["dev"]) >= set(ex["tensorboard"] + ex["plots"] + ex["video"])
    assert {"pytest", "hypothesis"} <= names(ex["dev"])
    core = names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert not core & OPTIONAL, core & OPTIONAL


def bare_imports() -> list[str]:
    """`import X` / `from X import` of an optional package anywhere in vlmkit/ or connectors/ (extras.py aside)."""
    found = []
    for f in [*(ROOT / "vlmkit").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]:
        if f.name == "extras.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{f.relative_to(ROOT)}:{node.lineno}: {m}" for m in mods if m.split(".")[0] in OPTIONAL]
    return found


def test_optional_packages_are_imported_only_through_require():
    assert bare_imports() == []


def test_missing_package_names_the_feature_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert available("json") and not available("vlmkit_no_such_module")
    with pytest.raises(MissingExtra, match=r"^the ablation plot needs the matplotlib package, which is not installed "
                                           r"\(.*\): pip install 'vlmkit\[plots\]' \(or pip install matplotlib\)$"):
        require("matplotlib", "plots", "the ablation plot")


def test_ablation_refuses_before_training_without_matplotlib(monkeypatch, tmp_path):
    from vlmkit.experiments import ablation

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    trained = []
    monkeypatch.setattr(ablation, "run_pair", lambda *a, **k: trained.append(a))
    abl = type("Abl", (), {"output_dir": str(tmp_path)})()
    with pytest.raises(MissingExtra, match=r"vlmkit\[plots\]"):
        ablation.run_ablation(abl, None, [("clip", "mlp2x_gelu")])
    assert trained == []
    with pytest.raises(MissingExtra, match=r"vlmkit\[plots\]"):
        ablation.plot([], tmp_path / "x.png")
