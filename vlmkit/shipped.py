"""The recipes and configs shipped with vlmkit: where they are, a config by name, a recipe run or copied.

The top-level recipes/ folder is installed as the package `vlmkit_recipes` (pyproject.toml maps it), with its
configs/ and accelerate/ folders as package data; in a checkout that is not installed, recipes/ is used directly.
`vlmkit recipe list | NAME [ARGS...] | copy NAME DIR` (vlmkit/cli.py) is built on these functions.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

PACKAGE = "vlmkit_recipes"


class RecipeError(ValueError):
    """A recipe or shipped config that does not exist (the message lists those that do)."""


def recipes_dir() -> Path:
    """The installed `vlmkit_recipes` package's folder, else the checkout's recipes/ next to vlmkit/."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    here = Path(__file__).resolve().parent.parent / "recipes"
    if here.is_dir():
        return here
    raise RecipeError(f"the shipped recipes are not installed (no {PACKAGE} package, no {here}): reinstall vlmkit")


def recipes() -> dict[str, str]:
    """Recipe name -> the first line of its docstring."""
    out = {}
    for f in sorted(recipes_dir().glob("*.py")):
        if f.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        out[f.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def recipe_path(name: str) -> Path:
    path = recipes_dir() / f"{name}.py"
    if name.startswith("_") or "/" in name or not path.is_file():
        raise RecipeError(f"no recipe {name!r}; the recipes are: {', '.join(recipes())} (vlmkit recipe list)")
    return path


def configs() -> list[str]:
    """The shipped configs, as paths relative to configs/ without `.yaml` (e.g. `llava15_7b`, `plans/llava15`)."""
    root = recipes_dir() / "configs"
    return sorted(str(f.relative_to(root).with_suffix("")) for f in root.rglob("*.yaml"))


def resolve_config(path: str | Path) -> str | Path:
    """`path` itself when it exists or names a file (has a suffix); else a shipped config of that name:
    `llava15_7b`, `plans/llava15` or a unique file name such as `lora_finetune_demo`. Raises RecipeError for a
    name that is neither."""
    p = Path(path)
    if p.exists() or p.suffix or p.is_absolute():
        return path
    try:
        shipped = configs()
    except RecipeError:
        return path
    name = str(path).replace("\\", "/")
    matches = [c for c in shipped if c == name] or [c for c in shipped if c.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return recipes_dir() / "configs" / f"{matches[0]}.yaml"
    what = f"is one of several shipped configs ({', '.join(matches)}): name one" if matches else (
        "is neither a file nor a shipped config")
    raise RecipeError(f"config {name!r} {what}; shipped: {', '.join(shipped)}")


def run_recipe(name: str, argv: list[str]) -> int:
    """Run recipe `name` as `python recipes/NAME.py ARGV...` would (in this process: under `accelerate launch -m
    vlmkit.cli recipe NAME` each process runs it). Returns its exit status."""
    import runpy

    path = recipe_path(name)
    saved = sys.argv[:]
    sys.argv = [str(path), *argv]  # what the recipe's argparse and its one-line errors see
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _mentions(text: str, rel: str) -> bool:
    """`text` names config `rel` (configs/-relative, with .yaml) by its file name, as a whole word."""
    return re.search(rf"(?<![\w.-]){re.escape(Path(rel).name)}(?![\w-])", text) is not None


def recipe_configs(name: str) -> list[str]:
    """The configs recipe `name` names, and those they name in turn (e.g. an ablation file's `base:`)."""
    root = recipes_dir() / "configs"
    every = [str(f.relative_to(root)) for f in sorted(root.rglob("*.yaml"))]
    found, todo = [], [recipe_path(name).read_text()]
    while todo:
        text = todo.pop()
        for rel in every:
            if rel not in found and _mentions(text, rel):
                found.append(rel)
                todo.append((root / rel).read_text())
    return sorted(found)


def copy_recipe(name: str, dest: str | Path) -> list[Path]:
    """Copy recipe `name` and its configs (same layout: DEST/NAME.py, DEST/configs/...) for editing. Refuses to
    overwrite a file already there. Returns the files written."""
    src, root, dest = recipe_path(name), recipes_dir(), Path(dest)
    files = [(src, dest / src.name)] + [(root / "configs" / r, dest / "configs" / r) for r in recipe_configs(name)]
    there = [str(d) for _, d in files if d.exists()]
    if there:
        raise RecipeError(f"vlmkit recipe copy does not overwrite: {', '.join(there)} already exist(s)")
    for s, d in files:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
    return [d for _, d in files]
