"""train.log_with / project / run_name: trackers by accelerate's names, each with the project and run name where it
takes them, started before anything is written; one that cannot start is an error before the model is built."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, on_main_process

from vlmkit.config import ConfigError, flat_config, load_config, tracker_names
from vlmkit.training import trackers
from vlmkit.training.engine import make_accelerator
from vlmkit.training.run import start_run

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "llava15_demo.yaml"


def demo(out: Path, *overrides: str):
    return load_config(DEMO, [f"train.output_dir={out}", *overrides])


def test_known_trackers_are_accelerates_and_unknown_ones_are_config_errors():
    import accelerate.utils

    assert set(tracker_names()) == {t.value for t in accelerate.utils.LoggerType} - {"all"}
    assert set(trackers.PACKAGES) == set(tracker_names())  # every accelerate tracker has its package named here
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) 'tensorbord'; known: aim, clearml, comet_ml, dvclive, "
                                          r"mlflow, swanlab, tensorboard, trackio, wandb \(or null for none\)"):
        demo(Path("x"), "train.log_with=[tensorboard, tensorbord]")
    for none in ("null", "none", "[]"):
        assert demo(Path("x"), f"train.log_with={none}").train.log_with is None
    cfg = demo(Path("x"), "train.log_with=[wandb, tensorboard, wandb]")
    assert cfg.train.log_with == ["wandb", "tensorboard"] and cfg.train.trackers() == ["wandb", "tensorboard"]


def test_missing_package_stops_the_cli_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from vlmkit import cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    monkeypatch.setattr(trackers, "available", lambda m: m != "wandb")
    out = tmp_path / "run"
    rc = cli.main(["train", str(DEMO), "--cpu", f"train.output_dir={out}", "train.log_with=[tensorboard, wandb]"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "train.log_with: wandb needs the wandb package" in err and "pip install 'vlmkit[wandb]'" in err, err
    assert not out.exists()  # no model folder, no log, no config, no TensorBoard folder


def test_tracker_whose_start_fails_is_an_error_and_output_dir_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoints" / "finetune" / "checkpoint-5").mkdir(parents=True)
    (out / "log.jsonl").write_text('{"stage": "finetune", "step": 5}\n')
    cfg = demo(out, "train.log_with=tensorboard", "train.resume=never")  # never: would remove the old run

    def refuse(self):
        raise PermissionError("cannot write the event file")

    monkeypatch.setattr(LOGGER_TYPE_TO_CLASS["tensorboard"], "start", refuse)
    acc = make_accelerator(cfg.train, cpu=True)
    with pytest.raises(trackers.TrackerError, match=r"a tracker could not start \(tensorboard: PermissionError: "
                                                    r"cannot write the event file\); nothing was trained"):
        start_run(cfg, acc)
    assert (out / "checkpoints" / "finetune" / "checkpoint-5").is_dir() and (out / "log.jsonl").read_text()
    assert not (out / "config.yaml").exists() and acc.trackers == []


def hparams(folder: Path) -> dict:
    """The hyper-parameters TensorBoard's hparams plugin holds under `folder` (read back as TensorBoard does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (sub,) = [p for p in folder.iterdir() if p.is_dir() and list(p.glob("events.out.tfevents.*"))]
    ea = EventAccumulator(str(sub))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.number_value if v.HasField("number_value") else v.bool_value if v.HasField("bool_value")
                else v.string_value) for k, v in info.hparams.items()}


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_run_folder_is_project_and_run_name_with_the_config_as_hparams(tmp_path):
    out = tmp_path / "run"
    cfg = demo(out, "train.log_with=tensorboard", "train.project=proj", "train.run_name=first",
               "stages.finetune.lr=1e-4")
    acc = make_accelerator(cfg.train, cpu=True)
    start_run(cfg, acc)
    acc.log({"finetune/loss": 0.5}, step=3)
    trackers.finish(acc)
    run_dir = out / "proj" / "first"
    assert list(run_dir.glob("events.out.tfevents.*")) and scalars(run_dir, "finetune/loss") == [(3, 0.5)]
    hp = hparams(run_dir)
    flat = flat_config(cfg)
    assert hp["stages.finetune.lr"] == pytest.approx(1e-4) and hp["train.run_name"] == "first"
    assert hp["train.project"] == "proj" and hp["model.encoder.name"] == "clip" and set(hp) == set(flat)
    # the default run name is the output_dir's folder name, the default project vlmkit
    cfg2 = demo(tmp_path / "second", "train.log_with=tensorboard")
    acc2 = make_accelerator(cfg2.train, cpu=True)
    start_run(cfg2, acc2)
    trackers.finish(acc2)
    assert cfg2.train.tracker_run_name() == "second"
    assert list((tmp_path / "second" / "vlmkit" / "second").glob("events.out.tfevents.*"))


class FileTracker(GeneralTracker):
    """A tracker registered with accelerate that writes what it gets to output_dir/<run>.jsonl."""
    name = "filetracker"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.jsonl"

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def start(self):
        self.path.write_text("")

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @on_main_process
    def store_init_configuration(self, values):
        self._write({"config": values})

    @on_main_process
    def log(self, values, step=None, **kwargs):
        self._write({"step": step, **values})


def test_two_trackers_both_start_get_the_config_and_the_logs(tmp_path, monkeypatch):
    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "filetracker", FileTracker)  # accelerate's register_tracker_class
    out = tmp_path / "run"
    cfg = demo(out, "train.log_with=[tensorboard, filetracker]", "train.project=p", "train.run_name=r")
    acc = make_accelerator(cfg.train, cpu=True)
    start_run(cfg, acc)
    assert [t.name for t in acc.trackers] == ["tensorboard", "filetracker"]
    acc.log({"pretrain/loss": 2.0}, step=1)
    trackers.finish(acc)
    records = [json.loads(x) for x in (out / "p.jsonl").read_text().splitlines()]  # a generic tracker: project
    assert records == [{"config": flat_config(cfg)}, {"step": 1, "pretrain/loss": 2.0}]
    assert scalars(out / "p" / "r", "pretrain/loss") == [(1, 2.0)]


def test_each_tracker_gets_project_and_run_name_its_own_way(tmp_path):
    out, made = tmp_path / "o", {}
    for name in tracker_names():
        made[name] = trackers.make_tracker(LOGGER_TYPE_TO_CLASS[name], name, "proj", "run1", out)
    assert made["tensorboard"].run_name == "run1" and made["tensorboard"].logging_dir_param == str(out / "proj")
    assert made["wandb"].run_name == "proj" and made["wandb"].init_kwargs == {"name": "run1", "dir": str(out)}
    assert made["mlflow"].experiment_name == "proj" and made["mlflow"].run_name == "run1"
    assert made["clearml"].user_provided_run_name == "proj" and made["clearml"].init_kwargs == {"task_name": "run1"}
    assert made["swanlab"].run_name == "proj" and made["swanlab"].init_kwargs == {"experiment_name": "run1"}
    assert made["trackio"].run_name == "proj" and made["trackio"].init_kwargs == {"name": "run1"}
    assert made["aim"].run_name == "run1" and made["aim"].init_kwargs == {"experiment": "proj"}
    assert made["comet_ml"].run_name == "proj"
