"""The demo configs checkpoint often enough that an interrupted demo loses under about a minute of training, and keep
few checkpoints (small on disk)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlmkit.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"

# (samples each stage's data holds in the embedded demo, measured seconds per optimizer step on the 2-core CPU)
# llava15: recipes/llava15.py's 12000 images; log.jsonl of a full demo run (4 min 13 s): pretrain 188 steps in
#   7.6 s (0.041 s/step), finetune 3000 steps in 235 s (0.078 s/step).
# llava_next / internvl: tiling_demo's 2000 images; README: stage 2 at ~47 samples/s with the CPU shared by both
#   demos (16 per step: 0.34 s/step); stage 1 taken at the same per-sample rate (32 per step: 0.68 s/step).
# llava_video: recipes/llava_video.py's 2000 clips; log.jsonl of the full demo run (README's Video demo):
#   finetune 1125 steps in 242 s (0.215 s/step; load average ~2.0, the run itself).
DEMOS = {
    "llava15_demo": {"pretrain": (12000, 0.041), "finetune": (12000, 0.078)},
    "llava_next_demo": {"pretrain": (2000, 0.68), "finetune": (2000, 0.34)},
    "internvl_demo": {"pretrain": (2000, 0.68), "finetune": (2000, 0.34)},
    "llava_video_demo": {"finetune": (2000, 0.215)},
}
STEPS = {"llava15_demo": {"pretrain": 188, "finetune": 3000},
         "llava_next_demo": {"pretrain": 63, "finetune": 625}, "internvl_demo": {"pretrain": 63, "finetune": 625},
         "llava_video_demo": {"finetune": 1125}}
MAX_LOST_SECONDS = 60.0


def test_every_demo_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*_demo.yaml")} == set(DEMOS)


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_saves_at_most_a_minute_of_steps_apart(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    every = cfg.train.save_steps
    assert every > 0, f"{name}: train.save_steps is 0: an interrupted demo restarts its stage"
    for stage in cfg.stages:
        samples, seconds_per_step = DEMOS[name][stage.name]
        total = stage.total_steps(samples, 1)
        assert total == STEPS[name][stage.name], (name, stage.name, total)
        # the longest stretch without a checkpoint: save_steps, or the whole stage when it is shorter (its last
        # step is saved as the stage's model); half the bound of slack for a busier machine than measured
        lost = min(every, total) * seconds_per_step
        assert lost <= MAX_LOST_SECONDS / 2, (name, stage.name, every, lost)
        assert total // every <= 64, (name, stage.name)  # not so often that saving dominates
    # each checkpoint is the tiny model and its optimizer states (~10 MB): at most 2 per stage are kept
    assert 1 <= cfg.train.keep_checkpoints <= 2
