"""Runs that meet trouble (issue 16, items 11-13): a damaged newest checkpoint is named and passed over, SIGTERM
and SIGINT stop at a step boundary with a resumable checkpoint (the rerun continues bit-exactly), a full disk is
named and nothing already saved is touched."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_errors import one_line_error
from test_resume import PROG, records, small_run, trace, write_run_config
from test_train import write_data
from vlmkit.training import checkpoint as ckpt
from vlmkit.models import serialization as model_mod
from vlmkit import preempt
from vlmkit.training.run import run
from vlmkit.cli import main
from vlmkit.errors import DiskFullError


# ---- 11. a damaged newest checkpoint -----------------------------------------------------------------------------
def _stopped_run(encoder_dirs, llm_dir, caps, out, steps=5):
    """A 5-step run with a checkpoint after every step, then made to look stopped after step 4 (checkpoints 3
    and 4 kept, no finished marker)."""
    cfg = small_run(encoder_dirs, llm_dir, caps, out, steps=steps)
    run(cfg, cpu=True)
    (out / "s1" / ckpt.STATE_NAME).unlink()
    return cfg


def test_a_damaged_newest_checkpoint_is_named_and_passed_over(encoder_dirs, llm_dir, tmp_path, capsys):
    caps, _ = write_data(tmp_path / "data", n=12)
    ref = tmp_path / "ref"
    run(small_run(encoder_dirs, llm_dir, caps, ref, steps=5), cpu=True)
    damages = {"truncated weights": lambda c: (c / "model.safetensors").write_bytes(
                   (c / "model.safetensors").read_bytes()[:5000]),
               "missing optimizer": lambda c: (c / "optimizer.pt").unlink(),
               "truncated optimizer": lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:99]),
               "missing rng": lambda c: (c / ckpt.RNG_NAME).unlink()}
    for i, (what, damage) in enumerate(damages.items()):
        out = tmp_path / f"run{i}"
        cfg = _stopped_run(encoder_dirs, llm_dir, caps, out)
        newest = out / "checkpoints" / "s1" / "checkpoint-4"
        damage(newest)
        capsys.readouterr()
        run(cfg, cpu=True)
        said = capsys.readouterr().out
        assert f"resume: {newest}" in said and "damaged, passed over" in said, (what, said)
        assert "resuming: stage s1 at step 3/5" in said, (what, said)
        assert trace(out) == trace(ref), what  # exactly the uninterrupted run
    # every checkpoint damaged and no finished stage: said, and the stage starts over (still the same run)
    out = tmp_path / "all"
    cfg = _stopped_run(encoder_dirs, llm_dir, caps, out)
    for c in (out / "checkpoints" / "s1").iterdir():
        (c / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    run(cfg, cpu=True)
    said = capsys.readouterr().out
    assert said.count("damaged, passed over") == 2 and "starts from its beginning" in said
    assert trace(out) == trace(ref)
    # an explicit path to a damaged checkpoint: a clear error
    bad = out / "checkpoints" / "s1" / "checkpoint-4"
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint-4 is damaged.*truncated"):
        ckpt.find_resume(out, ["s1"], str(bad))


# ---- 12. SIGTERM and SIGINT --------------------------------------------------------------------------------------
def _start(cfg: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    env.pop("VLMKIT_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", PROG, "train", cfg, "--cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _signal_at(proc, log: Path, stage: str, step: int, sig) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if log.exists() and any(r.get("stage") == stage and r.get("step") == step for r in records(log)):
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=240)
            return out
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step} of {stage}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out waiting for the step")


def test_sigterm_and_sigint_stop_with_a_checkpoint_and_the_rerun_is_exact(encoder_dirs, llm_dir, tmp_path):
    """SIGTERM in stage 1, then Ctrl-C (SIGINT) in stage 2 (LoRA dropout draws from the RNG): each run saves a
    checkpoint at the next step boundary and exits 128 + the signal; the same command then finishes the run with
    the losses, samples and weights of an uninterrupted one."""
    from safetensors.torch import load_file

    caps, qa = write_data(tmp_path / "data")
    ref_cfg = write_run_config(tmp_path / "ref.yaml", encoder_dirs["clip"], llm_dir, caps, qa, tmp_path / "ref")
    for p in (ref_cfg,):
        c = yaml.safe_load(Path(p).read_text())
        c["train"]["save_steps"] = 100  # no periodic checkpoint: the signal's is the only one
        Path(p).write_text(yaml.safe_dump(c))
    cfg = str(tmp_path / "run.yaml")
    c = yaml.safe_load(Path(ref_cfg).read_text())
    c["train"]["output_dir"] = str(tmp_path / "run")
    Path(cfg).write_text(yaml.safe_dump(c))
    out = tmp_path / "run"
    reference = _start(ref_cfg)
    p = _start(cfg)
    text = _signal_at(p, out / "log.jsonl", "pretrain", 3, signal.SIGTERM)
    first = [r for r in records(out / "log.jsonl")]
    assert p.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "stopped by SIGTERM after step" in text and "Traceback" not in text, text[-2000:]
    stopped_at = first[-1]["step"]
    assert (out / "checkpoints" / "pretrain" / f"checkpoint-{stopped_at}").is_dir()
    p = _start(cfg)
    text = _signal_at(p, out / "log.jsonl", "finetune", 2, signal.SIGINT)
    assert p.returncode == 128 + signal.SIGINT and "stopped by SIGINT" in text, text[-2000:]
    final = _start(cfg)
    text, _ = final.communicate(timeout=240)
    assert final.returncode == 0 and "resuming: stage finetune" in text, text[-2000:]
    ref_text, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, ref_text[-2000:]
    assert trace(out) == trace(tmp_path / "ref")  # bit-exact losses, grad norms, lr and samples
    a, b = (load_file(str(o / "model" / "model.safetensors")) for o in (out, tmp_path / "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_exit_status(tmp_path):
    """The first run of the test above exits 128 + SIGTERM (checked here on the exception, cheaply)."""
    e = preempt.Preempted(signal.SIGTERM, "s1", 3, tmp_path / "checkpoint-3")
    assert e.exit_code == 143 and "rerun the same command" in str(e)


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with preempt.handlers():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert preempt.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before and preempt.requested() is None


# ---- 13. a full disk ---------------------------------------------------------------------------------------------
def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_a_full_disk_is_named_and_nothing_saved_is_touched(encoder_dirs, llm_dir, tmp_path, monkeypatch, capsys, where):
    caps, _ = write_data(tmp_path / "data", n=8)
    out = tmp_path / "run"
    cfg = small_run(encoder_dirs, llm_dir, caps, out, steps=4)
    saved = {}
    real_save, real_torch_writer = model_mod.save_file, ckpt.torch_writer

    def snapshot():
        for c in (out / "checkpoints" / "s1").glob("checkpoint-*"):
            saved[c.name] = _digest(c)

    def full_save_file(tensors, filename, metadata=None):
        if "checkpoint-3" in filename:
            snapshot()
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    def full_torch_writer(obj):
        def write(path):
            if "checkpoint-3" in str(path):
                snapshot()
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_torch_writer(obj)(path)
        return write

    if where == "weights":
        monkeypatch.setattr(model_mod, "save_file", full_save_file)
    else:
        monkeypatch.setattr(ckpt, "torch_writer", full_torch_writer)
    with pytest.raises(DiskFullError) as ei:
        run(cfg, cpu=True)
    msg = str(ei.value)
    assert "no space left on device while writing" in msg and "checkpoint-3" in msg
    ckpts = out / "checkpoints" / "s1"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no partial one
    assert {c: _digest(ckpts / c) for c in ("checkpoint-1", "checkpoint-2")} == \
        {c: saved[c] for c in ("checkpoint-1", "checkpoint-2")}  # not a byte changed
    assert not [p for p in out.rglob(".*") if p.is_dir()]
    # from the command line: one line naming the path
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg)))))
    (out / "s1" / ckpt.STATE_NAME).unlink(missing_ok=True)
    import shutil

    shutil.rmtree(out)
    assert main(["train", str(tmp_path / "run.yaml"), "--cpu"]) == 1
    one_line_error(capsys.readouterr().err, "no space left on device while writing", "checkpoint-3")
