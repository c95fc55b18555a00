"""The training and experiments packages: the old module paths still give the same objects (deprecated
re-exports, silent at import), the derived batch quantities are StageConfig methods, and the library never
imports the recipes-only experiments package nor the deprecated paths."""
import ast
import importlib
import math
import pathlib
import warnings

import pytest

from vlmkit.config import DataConfig, StageConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOVED = {  # old path -> new path
    "vlmkit.stages": "vlmkit.training.stages",
    "vlmkit.precision": "vlmkit.training.precision",
    "vlmkit.flops": "vlmkit.training.flops",
    "vlmkit.progress": "vlmkit.training.progress",
    "vlmkit.preempt": "vlmkit.training.preempt",
    "vlmkit.distributed": "vlmkit.training.distributed",
    "vlmkit.checkpoint": "vlmkit.training.checkpoint",
    "vlmkit.ablation": "vlmkit.experiments.ablation",
    "vlmkit.tiling_demo": "vlmkit.experiments.tiling_demo",
    "vlmkit.data.demo": "vlmkit.experiments.demo",
    "vlmkit.data.demo_highres": "vlmkit.experiments.demo_highres",
}
TRAIN = {"run": "run", "train_stage": "loop", "make_optimizer": "optim", "BatchStream": "batches",
         "draw_window": "batches", "window_counts": "batches", "make_dataset": "batches", "make_loader": "batches",
         "micro_batching": "batches", "make_accelerator": "engine", "cpu_threads": "engine", "engine": "engine",
         "shards_weights": "engine", "configure_engine": "engine", "match_zero3_dtype": "engine",
         "plain_init": "engine", "refresh_fsdp_precision": "engine", "full_state_dict": "engine",
         "build_device": "engine", "save_checkpoint": "checkpoint", "save_model": "checkpoint"}


def public_names(module) -> set[str]:
    """The functions, classes and constants a module defines itself."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_paths_reexport_the_same_objects(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deprecated in the docstring, silent at import
        old_mod = importlib.import_module(old)
    new_mod = importlib.import_module(new)
    assert "deprecated" in old_mod.__doc__.lower() and new in old_mod.__doc__
    for name in public_names(new_mod):
        assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name}"


def test_vlmkit_train_reexports_the_training_package():
    old = importlib.import_module("vlmkit.train")
    assert "deprecated" in old.__doc__.lower()
    for name, where in TRAIN.items():
        assert getattr(old, name) is getattr(importlib.import_module(f"vlmkit.training.{where}"), name), name


def test_derived_batch_quantities_are_stage_config_methods():
    st = StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x.json"), global_batch_size=128,
                     per_device_batch_size=16, epochs=1.5, warmup_ratio=0.03)
    assert st.micro_batching(2) == (16, 4) and st.accumulation_steps(2) == 4 and st.accumulation_steps(8) == 1
    assert st.total_steps(1000, 2) == math.ceil(1.5 * math.ceil(1000 / 32) / 4) == 12
    assert st.warmup_steps(12) == 1 and st.warmup_steps(100) == 3
    st.max_steps = 7
    assert st.total_steps(1000, 2) == 7
    with pytest.raises(ValueError, match="global_batch_size 128 cannot be split"):
        st.micro_batching(3)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of the vlmkit modules a file imports (function-level imports included)."""
    package = list(path.relative_to(ROOT).parts[:-1])  # what `from .` means in this file (a module or __init__)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("vlmkit")}


def test_library_imports_neither_experiments_nor_deprecated_paths():
    deprecated = set(MOVED) | {"vlmkit.train"}
    for path in sorted((ROOT / "vlmkit").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        if rel in deprecated or rel.startswith("vlmkit.experiments"):
            continue  # the re-exports themselves, and experiments may use the whole library
        names = imported_modules(path)
        assert not {n for n in names if n.startswith("vlmkit.experiments")}, f"{rel} imports vlmkit.experiments"
        if rel.startswith("vlmkit.training"):
            assert not names & deprecated, f"{rel} imports a deprecated path: {names & deprecated}"
