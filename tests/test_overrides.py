"""Dotted `key=value` overrides after the YAML (`vlmkit train CONFIG k=v ...`, the recipes' `--config X k=v`):
applied to the raw dict before the typed config is built, so its checks and errors apply."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlmkit.config import ConfigError, apply_overrides, load_config

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "llava15_demo.yaml"


def test_stage_by_name_and_by_index():
    cfg = load_config(DEMO, ["stages.finetune.lr=1e-4", "stages.0.max_steps=3", "stages.-1.epochs=2"])
    pre, fine = cfg.stages
    assert fine.lr == 1e-4 and isinstance(fine.lr, float)
    assert pre.max_steps == 3 and fine.epochs == 2.0
    assert pre.lr == 3.0e-3  # untouched


def test_nested_values_and_created_sections():
    cfg = load_config(DEMO, ["train.output_dir=runs/x", "stages.finetune.data.pack=false",
                             "model.tiling.mode=anyres", "model.tiling.grid_pinpoints=[[48, 96], [96, 48]]",
                             "train.log_with=null", "model.encoder.image_std=[1, 1, 1]"])
    assert cfg.train.output_dir == "runs/x" and cfg.train.log_with is None
    assert cfg.stages[1].data.pack is False
    assert cfg.model.tiling.mode == "anyres" and cfg.model.tiling.grid_pinpoints == [[48, 96], [96, 48]]
    assert list(cfg.model.encoder.image_std) == [1, 1, 1]


def test_the_raw_dict_is_not_changed():
    raw = {"train": {"output_dir": "a"}, "stages": [{"name": "s", "lr": 1}]}
    got = apply_overrides(raw, ["train.output_dir=b", "stages.s.lr=2"])
    assert got == {"train": {"output_dir": "b"}, "stages": [{"name": "s", "lr": 2}]}
    assert raw["train"]["output_dir"] == "a" and raw["stages"][0]["lr"] == 1


def test_type_error_is_the_typed_configs():
    with pytest.raises(ConfigError, match=r"stages\[1\]\.lr must be a number.*'fast'") as e:
        load_config(DEMO, ["stages.finetune.lr=fast"])
    assert "stages.finetune.lr=fast" in str(e.value) and str(DEMO) in str(e.value)
    with pytest.raises(ConfigError, match="train.log_every must be an integer"):
        load_config(DEMO, ["train.log_every=[1, 2]"])


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match=r"stages\[1\]: unknown keys \['lrr'\]"):
        load_config(DEMO, ["stages.finetune.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"train: unknown keys \['ouput_dir'\]"):
        load_config(DEMO, ["train.ouput_dir=x"])


def test_bad_stage_name_or_index_lists_the_stages():
    with pytest.raises(ConfigError, match=r"stages has no item named 'fintune'; names: pretrain, finetune"):
        load_config(DEMO, ["stages.fintune.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"stages has 2 item\(s\), no index 5"):
        load_config(DEMO, ["stages.5.lr=1e-4"])


@pytest.mark.parametrize("bad", ["stages.finetune.lr", "=3", "a..b=1", "train.seed=[1,"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({"train": {}}, [bad])


def test_descending_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"train.seed is 0, not a mapping"):
        apply_overrides({"train": {"seed": 0}}, ["train.seed.x=1"])


def test_cli_takes_overrides_before_and_after_options():
    from vlmkit.cli import build_parser
    from vlmkit.config import parse_run_args

    args = parse_run_args(build_parser(), ["train", "x.yaml", "a.b=1", "--cpu", "stages.0.lr=2", "--no-resume"])
    assert args.config == "x.yaml" and args.overrides == ["a.b=1", "stages.0.lr=2"] and args.cpu
    with pytest.raises(SystemExit):
        parse_run_args(build_parser(), ["train", "x.yaml", "--bogus"])
    with pytest.raises(SystemExit):  # a verb without overrides takes none
        parse_run_args(build_parser(), ["export", "m", "out", "a=1"])


def test_vlmkit_train_reports_a_bad_override_in_one_line(capsys):
    from vlmkit.cli import main

    assert main(["train", str(DEMO), "stages.fintune.lr=1"]) == 1
    err = capsys.readouterr().err
    assert "no item named 'fintune'" in err and "Traceback" not in err
