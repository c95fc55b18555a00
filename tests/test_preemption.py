"""Runs that meet trouble (issue 16, items 11-13): a damaged newest checkpoint is named and passed over, SIGTERM
and SIGINT stop at a step boundary with a resumable checkpoint (the rerun continues bit-exactly), a full disk is
named and nothing already saved is touched."""
from __future__ import annotations


import pytest

from test_resume import small_run, trace
from test_train import write_data
from vlmkit import checkpoint as ckpt
from vlmkit import train as train_mod


# ---- 11. a damaged newest checkpoint -----------------------------------------------------------------------------
def _stopped_run(encoder_dirs, llm_dir, caps, out, steps=5):
    """A 5-step run with a checkpoint after every step, then made to look stopped after step 4 (checkpoints 3
    and 4 kept, no finished marker)."""
    cfg = small_run(encoder_dirs, llm_dir, caps, out, steps=steps)
    train_mod.run(cfg, cpu=True)
    (out / "s1" / ckpt.STATE_NAME).unlink()
    return cfg


def test_a_damaged_newest_checkpoint_is_named_and_passed_over(encoder_dirs, llm_dir, tmp_path, capsys):
    caps, _ = write_data(tmp_path / "data", n=12)
    ref = tmp_path / "ref"
    train_mod.run(small_run(encoder_dirs, llm_dir, caps, ref, steps=5), cpu=True)
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
        train_mod.run(cfg, cpu=True)
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
    train_mod.run(cfg, cpu=True)
    said = capsys.readouterr().out
    assert said.count("damaged, passed over") == 2 and "starts from its beginning" in said
    assert trace(out) == trace(ref)
    # an explicit path to a damaged checkpoint: a clear error
    bad = out / "checkpoints" / "s1" / "checkpoint-4"
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint-4 is damaged.*truncated"):
        ckpt.find_resume(out, ["s1"], str(bad))
