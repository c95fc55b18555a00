"""The end-of-run summary (vlmkit/training/summary.py): its text, and that a run prints it."""
from __future__ import annotations

from vlmkit.training.summary import summary


def test_summary_text():
    stages = [{"stage": "pretrain", "steps": 188, "seconds": 62.4, "train_samples_per_second": 512.34,
               "train_tokens_per_second": 123456.7, "final_loss": 1.23456, "skipped": []},
              {"stage": "finetune", "steps": 12, "seconds": 3725.0, "train_samples_per_second": 8.0,
               "train_tokens_per_second": 900.2, "final_loss": 0.5, "skipped": [{"id": 3}, {"id": 9}]},
              {"stage": "done_before"}]  # finished before a resume, its metrics.json unreadable
    assert summary(stages, "runs/x") == (
        "run finished: 3 stage(s)\n"
        "stage        steps  samples/s  tokens/s  final loss      time  skipped\n"
        "pretrain       188      512.3   123,457      1.2346     1m02s        0\n"
        "finetune        12        8.0       900      0.5000  1h02m05s        2\n"
        "done_before      -          -         -           -         -        -\n"
        "model: runs/x/model\n"
        "config: runs/x/config.yaml\n")


def test_summary_without_a_saved_model():
    text = summary([{"stage": "s", "steps": 1, "seconds": 0.25}], "out", model_saved=False)
    assert "0.2s" in text and "model: not saved (train.save_models: false)" in text
