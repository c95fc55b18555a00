"""Every shipped config loads and validates; config errors name the offending key."""
from pathlib import Path

import pytest

from vlmkit.config import ConfigError, RunConfig, from_dict, load_config, load_stages
from vlmkit.registry import CONNECTORS, ENCODERS, TEMPLATES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))
PLANS = sorted((CONFIG_DIR / "plans").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert SHIPPED, f"no configs under {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.stages
    m = cfg.model
    assert m.encoder.name in ENCODERS and m.connector.name in CONNECTORS
    for template in [m.template] + [s.data.template for s in cfg.stages if s.data.template]:
        assert template in TEMPLATES
    for s in cfg.stages:
        assert s.global_batch_size % s.per_device_batch_size == 0 and s.data.path


@pytest.mark.parametrize("path", PLANS, ids=[p.name for p in PLANS])
def test_shipped_stage_plan_loads(path):
    """Plans for models that already exist: stages (data paths given on the command line) and train."""
    stages, train = load_stages(path)
    assert stages and train.output_dir
    for s in stages:
        assert any(p.trains for p in s.train.values())
        assert all(p.lr is None or 0 < p.lr < 1 for p in s.train.values())


MINIMAL = {
    "model": {"encoder": {"name": "clip", "config": {"image_size": 16}}, "llm": {"path": "some/llm"}},
    "stages": [{"name": "s1", "train": {"connector": "full"}, "data": {"path": "d.json"}}],
}


def test_unknown_key_is_named_with_its_path():
    import copy

    bad = copy.deepcopy(MINIMAL)
    bad["stages"][0]["data"]["max_lenght"] = 10
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data: unknown keys \['max_lenght'\]"):
        from_dict(RunConfig, bad)
    cfg = from_dict(RunConfig, MINIMAL)
    assert cfg.stages[0].lr == 2e-5 and cfg.model.encoder.feature_layer is None  # the kind's default:
    import dataclasses

    from vlmkit.encoders import encoder_geometry

    enc = dataclasses.replace(cfg.model.encoder, config={"image_size": 64})  # a multiple of CLIP's default patch 32
    assert encoder_geometry(enc).layout.layer == -2  # clip: LLaVA-1.5's second-to-last layer


@pytest.mark.parametrize("patch,needle", [
    ({"model": {"encoder": {"name": "clip"}, "llm": {"path": "x"}}}, "encoder: give `path`"),
    ({"model": {"encoder": {"name": "clip", "path": "x"}, "llm": {"config": {}}}}, "needs `tokenizer`"),
    ({"model": {"encoder": {"name": "clip", "path": "x", "image_aspect": "crop"}, "llm": {"path": "x"}}},
     "image_aspect"),
])
def test_invalid_model_sections(patch, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(RunConfig, {**MINIMAL, **patch})


def test_duplicate_stage_names():
    d = dict(MINIMAL, stages=MINIMAL["stages"] * 2)
    with pytest.raises(ConfigError, match="unique"):
        from_dict(RunConfig, d)


def test_yaml_numbers_become_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {encoder: {name: clip, path: x}, llm: {path: y}}\n"
                 "stages: [{name: s, train: {llm: full}, data: {path: d.json}, lr: 1e-3}]\n")
    cfg = load_config(p)
    assert cfg.stages[0].lr == 1e-3 and isinstance(cfg.stages[0].lr, float)
    p.write_text("model: {encoder: {name: clip, path: x}, llm: {path: y}}\nstages: [{name: s, train: {}, data: {}}]\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
