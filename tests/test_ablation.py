"""The ablation runner: shipped ablation files resolve, pairs train and report, finished pairs are reused."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from vlmkit.experiments import ablation
from vlmkit.experiments.ablation import AblationConfig, load_ablation, run_ablation
from vlmkit.config import ConfigError, RunConfig, from_dict
from vlmkit.registry import CONNECTORS, ENCODERS

ABLATIONS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs" / "ablations").glob("*.yaml"))
VIT = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2)


def test_there_are_shipped_ablations():
    assert ABLATIONS


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.name for p in ABLATIONS])
def test_shipped_ablation_loads(path):
    abl, base = load_ablation(path)
    assert isinstance(base, RunConfig) and base.stages
    for sel in abl.presets.values():
        for e, c in abl.select(sel["encoders"], sel["connectors"]):
            assert abl.encoders[e]["name"] in ENCODERS and abl.connectors[c]["name"] in CONNECTORS
    assert abl.select()  # the default selection is not empty


def test_selection_and_errors():
    abl = AblationConfig(base="b.yaml", encoders={"a": {"name": "clip", "config": {}}, "b": {"name": "dinov2", "config": {}}},
                         connectors={"m": {"name": "mlp2x_gelu"}},
                         presets={"one": {"encoders": ["b"], "connectors": ["m"]}})
    assert abl.select() == [("a", "m"), ("b", "m")]
    assert abl.select(preset="one") == [("b", "m")]
    assert abl.select(["a"], preset="one") == [("a", "m")]
    with pytest.raises(ConfigError, match=r"unknown encoder\(s\) \['c'\]"):
        abl.select(["c"])
    with pytest.raises(ConfigError, match="preset 'bad'.*unknown connector"):
        AblationConfig(base="b", encoders={"a": {"name": "clip", "config": {}}}, connectors={"m": {"name": "mlp2x_gelu"}},
                       presets={"bad": {"encoders": ["a"], "connectors": ["x"]}})
    with pytest.raises(ConfigError, match="encoders.a.*feature_layr"):  # a typo fails before any training
        AblationConfig(base="b", encoders={"a": {"name": "clip", "config": {}, "feature_layr": 1}},
                       connectors={"m": {"name": "mlp2x_gelu"}})
    with pytest.raises(ConfigError, match="names a folder"):
        AblationConfig(base="b", encoders={"a__b": {"name": "clip", "config": {}}}, connectors={"m": {"name": "mlp2x_gelu"}})


@pytest.fixture()
def tiny_ablation(tmp_path):
    from vlmkit.experiments.demo import corpus, make_demo_data, train_tokenizer

    paths = make_demo_data(tmp_path / "data", n_train=24, n_eval=3, size=16, seed=0, jitter=0.0)
    tok = train_tokenizer(corpus([paths["captions"], paths["train"], paths["eval"]]), tmp_path / "tokenizer")
    llm = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=256)
    base = from_dict(RunConfig, {
        "model": {"encoder": {"name": "clip", "config": VIT}, "llm": {"config": llm, "tokenizer": tok}},
        "stages": [
            {"name": "pretrain", "train": {"connector": "full"}, "max_steps": 1, "global_batch_size": 8,
             "per_device_batch_size": 8, "data": {"path": paths["captions"], "template": "plain", "num_workers": 0}},
            {"name": "finetune", "train": {"connector": "full", "llm": "full"}, "max_steps": 2, "global_batch_size": 4,
             "per_device_batch_size": 4, "data": {"path": paths["train"], "num_workers": 0}},
        ],
        "train": {"output_dir": str(tmp_path / "unused"), "log_with": None},
    })
    abl = AblationConfig(
        base="(in memory)", output_dir=str(tmp_path / "ablation"), eval_data=paths["eval"],
        encoders={"clip": {"name": "clip", "config": VIT},
                  "dinov2": {"name": "dinov2", "config": dict(VIT, model_type="dinov2")}},
        connectors={"mlp": {"name": "mlp2x_gelu"}})
    return abl, base


def test_ablation_trains_reports_and_reuses(tiny_ablation, monkeypatch):
    abl, base = tiny_ablation
    pairs = abl.select()
    rows, paths = run_ablation(abl, base, pairs, cpu=True)
    out = Path(abl.output_dir)
    assert [(r["encoder"], r["connector"]) for r in rows] == pairs
    for r in rows:
        assert (out / f"{r['encoder']}__{r['connector']}" / "model" / "model.safetensors").exists()
        assert r["image_tokens"] == 16  # a 4 x 4 patch grid, one image per sample
        assert 0 <= r["eval_accuracy"] <= 1 and r["train_samples_per_second"] > 0 and r["peak_memory_mib"] > 0
    # trainable parameters of the last stage (connector + LLM), counted independently
    from vlmkit.model import VLM

    m = VLM.from_pretrained(out / "clip__mlp" / "model")
    assert rows[0]["trainable_params"] == sum(p.numel() for n, p in m.named_parameters() if not n.startswith("encoder."))
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [t["encoder"] for t in table] == ["clip", "dinov2"] and set(ablation.COLUMNS) <= set(table[0])
    md = Path(paths["md"]).read_text()
    assert md.count("\n| ") == 2 and "image tokens / sample" in md and "| dinov2 | mlp |" in md
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"

    # started again: nothing trains, the same rows come back
    def no_training(*a, **k):
        raise AssertionError("a finished pair was trained again")

    monkeypatch.setattr("vlmkit.training.run.run", no_training)  # where run_pair looks it up
    again, _ = run_ablation(abl, base, pairs, cpu=True)
    assert again == rows

    # saved by a vlmkit without a setting added since (at its default): still the same configuration
    saved_file = out / "clip__mlp" / ablation.CONFIG_NAME
    saved = json.loads(saved_file.read_text())
    del saved["run"]["model"]["encoder"]["position_init_std"], saved["run"]["train"]["keep_checkpoints"]
    saved_file.write_text(json.dumps(saved))
    assert run_ablation(abl, base, pairs[:1], cpu=True)[0] == rows[:1]
    saved["run"]["model"]["encoder"]["removed_setting"] = 1  # one it no longer knows: a different one
    saved_file.write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="a finished pair was trained again"):
        run_ablation(abl, base, pairs[:1], cpu=True)

    # a pair whose configuration changed trains again, from scratch (its old checkpoints are not resumed)
    monkeypatch.undo()
    abl.connectors["mlp"] = {"name": "mlp2x_gelu", "options": {"depth": 1}}
    seen = []
    import vlmkit.training.run

    real = vlmkit.training.run.run

    def spy(cfg, **kw):
        seen.append(cfg.train.resume)
        return real(cfg, **kw)

    monkeypatch.setattr("vlmkit.training.run.run", spy)
    changed, _ = run_ablation(abl, base, [("clip", "mlp")], cpu=True)
    assert seen == ["never"] and changed[0]["trainable_params"] < rows[0]["trainable_params"]
    saved = json.loads((out / "clip__mlp" / ablation.CONFIG_NAME).read_text())
    assert saved["run"]["model"]["connector"]["options"] == {"depth": 1}


def test_recipe_command_line(tiny_ablation, tmp_path, monkeypatch):
    """recipes/ablate_encoders.py: --encoders / --connectors select pairs of an ablation file."""
    import importlib.util

    abl, base = tiny_ablation
    base_file = tmp_path / "base.yaml"
    from vlmkit.config import to_dict

    base_file.write_text(yaml.safe_dump(to_dict(base)))
    abl_file = tmp_path / "abl.yaml"
    abl_file.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": abl.output_dir, "eval_data": abl.eval_data,
                                        "encoders": abl.encoders, "connectors": abl.connectors}))
    spec = importlib.util.spec_from_file_location(
        "ablate", Path(__file__).resolve().parent.parent / "recipes" / "ablate_encoders.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--config", str(abl_file), "--encoders", "dinov2", "--cpu"])
    table = (Path(abl.output_dir) / "ablation.md").read_text()
    assert "| dinov2 | mlp |" in table and "| clip |" not in table


def test_generic_backbone_and_compressor_in_an_ablation(tiny_ablation):
    """Issue 9's parts run through the same runner: a transformers ViT through the `hf` adapter, a resampler."""
    abl, base = tiny_ablation
    abl.encoders["vit"] = {"name": "hf", "config": dict(VIT, model_type="vit")}
    abl.connectors["resampler"] = {"name": "perceiver_resampler", "options": {"num_latents": 3, "depth": 1, "heads": 2}}
    rows, paths = run_ablation(abl, base, [("vit", "resampler")], cpu=True)
    assert rows[0]["image_tokens"] == 3 and "| vit | resampler | 3 |" in Path(paths["md"]).read_text()
