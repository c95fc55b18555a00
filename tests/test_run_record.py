"""A run records what it trained with: output_dir/config.yaml (the resolved config, after overrides, loadable by
load_config) and the same config, flat, as the trackers' hyper-parameters."""
from __future__ import annotations

from pathlib import Path

from vlmkit.config import flat_config, load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def test_saved_config_loads_back_equal(tmp_path):
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path, ["stages.0.lr=1e-4", "train.seed=3"])
        again = load_config(save_config(cfg, tmp_path / "config.yaml"))
        assert again == cfg, path


def test_flat_config_is_scalars_with_dotted_keys():
    flat = flat_config(load_config(CONFIGS / "llava15_demo.yaml", ["stages.finetune.lr=1e-4"]))
    assert flat["stages.finetune.lr"] == 1e-4 and flat["stages.pretrain.lr"] == 3.0e-3
    assert flat["model.encoder.name"] == "clip" and flat["train.seed"] == 0
    assert flat["model.encoder.image_std"] == "[2.0, 2.0, 2.0]" and flat["model.encoder.path"] == "None"
    assert flat["stages.finetune.data.pack"] is True
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_start_run_writes_the_config_and_gives_the_trackers_its_hparams(tmp_path, monkeypatch):
    from vlmkit.training import trackers
    from vlmkit.training.engine import make_accelerator
    from vlmkit.training.run import start_run

    cfg = load_config(CONFIGS / "llava15_demo.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                      "stages.finetune.lr=1e-4", "train.log_with=tensorboard"])
    acc = make_accelerator(cfg.train, cpu=True)
    (tracker,) = acc.log_with
    seen = {}
    real = type(tracker).store_init_configuration

    def spy(self, values):
        seen.update(values)
        return real(self, values)  # the real TensorBoard tracker takes them (add_hparams)

    monkeypatch.setattr(type(tracker), "store_init_configuration", spy)
    out, point = start_run(cfg, acc)
    try:
        assert point is None and load_config(out / "config.yaml") == cfg
        assert seen == flat_config(cfg) and seen["stages.finetune.lr"] == 1e-4
        events = list((out / "vlmkit" / "run").rglob("events.out.tfevents.*"))  # <project>/<run name>
        assert events, sorted(p.name for p in out.rglob("*"))
    finally:
        trackers.finish(acc)
