"""`vlmkit recipe list | NAME | copy`, shipped configs by name, and the recipes after a non-editable install."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit.cli import main
from vlmkit.config import load_config, read_yaml
from vlmkit.shipped import RecipeError, copy_recipe, recipe_configs, recipes, recipes_dir, resolve_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["ablate_encoders", "internvl", "llava15", "llava_next", "llava_video", "lora_finetune"]


def test_recipes_are_listed_with_their_first_doc_line(capsys):
    assert recipes_dir() == ROOT / "recipes"  # not installed: the checkout's folder
    assert list(recipes()) == RECIPES
    assert recipes()["llava15"].startswith("LLaVA-1.5: CLIP + 2-layer MLP + LLM")
    assert main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{r} " in out for r in RECIPES) and "llava15_7b" in out and "plans/lora_finetune" in out


@pytest.mark.parametrize("name,rel", [("llava15_7b", "llava15_7b.yaml"), ("plans/llava15", "plans/llava15.yaml"),
                                      ("lora_finetune_demo", "plans/lora_finetune_demo.yaml"),
                                      ("demo", "ablations/demo.yaml")])
def test_shipped_config_by_name(name, rel):
    assert resolve_config(name) == ROOT / "recipes" / "configs" / rel


def test_config_names_and_paths():
    assert load_config("llava15_7b").stages[1].lr == 2e-5  # --config llava15_7b anywhere
    assert read_yaml("plans/llava15") == read_yaml(ROOT / "recipes" / "configs" / "plans" / "llava15.yaml")
    assert resolve_config("no/such.yaml") == "no/such.yaml"  # a file name is left to open() and its error
    with pytest.raises(RecipeError, match=r"^config 'llava16' is neither a file nor a shipped config; shipped: "
                                          r"ablations/demo, internvl_demo, "):
        resolve_config("llava16")


def test_copy_takes_the_recipe_and_the_configs_it_names(tmp_path, capsys):
    assert recipe_configs("llava15") == ["llava15_7b.yaml", "llava15_demo.yaml"]
    # the ablation file names its base run config (`base: ../llava15_demo.yaml`): copied too, same layout
    assert recipe_configs("ablate_encoders") == ["ablations/demo.yaml", "llava15_demo.yaml"]
    assert main(["recipe", "copy", "ablate_encoders", str(tmp_path / "mine")]) == 0
    files = sorted(str(p.relative_to(tmp_path / "mine")) for p in (tmp_path / "mine").rglob("*") if p.is_file())
    assert files == ["ablate_encoders.py", "configs/ablations/demo.yaml", "configs/llava15_demo.yaml"]
    assert (tmp_path / "mine" / "configs" / "ablations" / "demo.yaml").read_text() == \
        (ROOT / "recipes" / "configs" / "ablations" / "demo.yaml").read_text()
    from vlmkit.experiments.ablation import load_ablation

    load_ablation(tmp_path / "mine" / "configs" / "ablations" / "demo.yaml")  # its base: resolves in the copy
    with pytest.raises(RecipeError, match="does not overwrite: .*ablate_encoders.py"):
        copy_recipe("ablate_encoders", tmp_path / "mine")
    capsys.readouterr()
    assert main(["recipe", "copy", "llava15"]) == 1
    assert "usage: vlmkit recipe copy NAME DIR" in capsys.readouterr().err


def test_run_a_recipe_in_process(capsys):
    assert main(["recipe", "llava15", "--help"]) == 0
    assert "--config CONFIG" in capsys.readouterr().out
    assert main(["recipe", "nope"]) == 1
    assert capsys.readouterr().err == ("vlmkit recipe: error: no recipe 'nope'; the recipes are: ablate_encoders, "
                                       "internvl, llava15, llava_next, llava_video, lora_finetune (vlmkit recipe list)\n")
    assert main(["recipe", "llava15", "--config", "llava16"]) == 1  # the recipe's own one-line error
    assert "config 'llava16' is neither a file nor a shipped config" in capsys.readouterr().err


def test_recipe_under_accelerate_launch(tmp_path):
    from conftest import ACCELERATE_LAUNCH, launch_env

    p = subprocess.run([*ACCELERATE_LAUNCH, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "--cpu", "-m", "vlmkit.cli", "recipe", "llava15", "--help"],
                       cwd=tmp_path, env=launch_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--config CONFIG" in p.stdout, p.stderr[-2000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The project built as a wheel (from a copy of its sources) and installed with --target: no checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "vlmkit", "connectors", "recipes"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")], cwd=src,
                   check=True, timeout=120)
    wheel = next((tmp / "dist").glob("vlmkit-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True, timeout=120)
    return tmp / "site"


def test_wheel_holds_every_module_and_recipe_file(site):
    for folder, dest in (("vlmkit", "vlmkit"), ("connectors", "connectors"), ("recipes", "vlmkit_recipes")):
        missing = [str(f.relative_to(ROOT)) for f in (ROOT / folder).rglob("*")
                   if f.is_file() and f.suffix in (".py", ".yaml", ".json") and "__pycache__" not in f.parts
                   and not (site / dest / f.relative_to(ROOT / folder)).is_file()]
        assert missing == [], f"not in the wheel (pyproject.toml packages / package-data): {missing}"


def test_recipes_after_a_non_editable_install(site, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site),
                                                                        "OMP_NUM_THREADS": "1"}

    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    out = run("-m", "vlmkit.cli", "recipe", "list")
    assert all(f"{r} " in out for r in RECIPES) and f"in {site / 'vlmkit_recipes'} " in out
    assert "shipped configs (--config NAME): ablations/demo, internvl_demo, internvl_qwen25_7b, llava15_7b" in out
    # the help of the recipe installed in site/ (the checkout is not on the path: cwd and PYTHONPATH are elsewhere)
    assert "usage: llava15.py" in run("-m", "vlmkit.cli", "recipe", "llava15", "--help")
