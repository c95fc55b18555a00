"""Experiment trackers (`train.log_with`, `train.project`, `train.run_name`): built, checked and started before
the model is built, so a tracker that cannot start stops the run before anything is trained or overwritten.

`build(train)` (in `make_accelerator`, before the Accelerator exists) turns each name into accelerate's tracker
object with the project and run name where that tracker takes them, after checking its package is installed
(`vlmkit.extras.require`: the error names the pip extra). `start(accelerator, cfg)` (at the start of `run`,
before output_dir is touched) starts each one and gives it the resolved config, flat, as hyper-parameters; one
that raises is a `TrackerError` naming it. Where each tracker writes:

- tensorboard: output_dir/<project>/<run_name>/ (scalars; hparams in a sub-folder, as TensorBoard writes them)
- wandb: wandb.init(project=project, name=run_name, dir=output_dir)
- mlflow: experiment project, run run_name; clearml: project / task run_name; aim: experiment project, run
  run_name, repository output_dir; swanlab: project, experiment_name run_name; trackio: project, name run_name;
  comet_ml: project (comet names the experiment); dvclive: output_dir/dvclive/.
"""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, TrainConfig, flat_config, tracker_names
from ..extras import available, require

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "comet_ml": ("comet_ml", None),
            "aim": ("aim", None), "mlflow": ("mlflow", None), "clearml": ("clearml", None),
            "dvclive": ("dvclive", None), "swanlab": ("swanlab", None), "trackio": ("trackio", None)}
"""tracker name -> (module its tracker imports, vlmkit extra that installs it or None)."""


class TrackerError(RuntimeError):
    """A tracker named in train.log_with could not start; nothing was trained."""


def check_installed(name: str) -> None:
    """MissingExtra (with the pip command) when the package tracker `name` needs is not installed."""
    module, extra = PACKAGES.get(name, (None, None))
    if module is None or available(module) or (name == "tensorboard" and available("tensorboardX")):
        return
    require(module, extra, f"train.log_with: {name}")


def build(train: TrainConfig) -> list:
    """accelerate's tracker objects for `train.log_with` (not started), every package checked first."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = train.trackers()
    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:  # TrainConfig checked the names; a config built before a tracker was unregistered
        raise TrackerError(f"train.log_with: unknown tracker(s) {unknown}; known: {', '.join(tracker_names())}")
    for name in names:
        check_installed(name)
    out, project, run = Path(train.output_dir), train.project, train.tracker_run_name()
    return [make_tracker(LOGGER_TYPE_TO_CLASS[name], name, project, run, out) for name in names]


def make_tracker(cls, name: str, project: str, run: str, out: Path):
    """Tracker `name` (accelerate class `cls`) with the project and run name where it takes them."""
    if name == "tensorboard":
        return cls(run, str(out / project))
    if name == "wandb":
        return cls(project, name=run, dir=str(out))
    if name == "mlflow":
        return cls(experiment_name=project, run_name=run)
    if name == "clearml":
        return cls(project, task_name=run)
    if name == "aim":
        return cls(run, str(out), experiment=project)
    if name == "swanlab":
        return cls(project, experiment_name=run)
    if name == "trackio":
        return cls(project, name=run)
    if name == "dvclive":
        return cls(run, dir=str(out / "dvclive"))
    if getattr(cls, "requires_logging_directory", False):  # comet_ml, and trackers registered with accelerate
        return cls(project, str(out))
    return cls(project)


def start(accelerator, cfg: RunConfig) -> None:
    """Start every tracker of the accelerator and give it the resolved config as hyper-parameters; TrackerError
    (on every process) when one cannot, after finishing the ones that started."""
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import gather_object

    pending = list(accelerator.log_with)
    if not pending:
        return
    if not all(isinstance(t, GeneralTracker) for t in pending):  # an Accelerator made outside make_accelerator
        pending = build(cfg.train)
    flat, problem = flat_config(cfg), None
    for tracker in pending:
        try:
            tracker.start()
            accelerator.trackers.append(tracker)
            tracker.store_init_configuration(flat)
        except Exception as e:  # noqa: BLE001 - any tracker's own failure (login, server, folder) is reported
            problem = f"{getattr(tracker, 'name', type(tracker).__name__)}: {type(e).__name__}: {e}"
            break
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        finish(accelerator)
        raise TrackerError(f"train.log_with: a tracker could not start ({'; '.join(problems)}); nothing was "
                           f"trained: fix it, or leave it out of train.log_with (null: no tracker)")


def finish(accelerator) -> None:
    """End every started tracker (not accelerator.end_training(): that also destroys the process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
