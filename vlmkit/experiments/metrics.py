"""What a demo run reports: accuracy on its held-out questions with the images and with blank ones, next to
the training figures of its stages (the recipes' metrics.json)."""
from __future__ import annotations

import time

from ..evaluate import evaluate


def demo_metrics(model, path: str, stage_metrics: list[dict], t0: float) -> dict:
    """A demo run's metrics.json body: accuracy with the images and with blank ones (what the text
    alone answers), per type, and the training figures of its stages."""
    ev = evaluate(model, path)
    blank = evaluate(model, path, blank_images=True)
    return {
        "eval_accuracy": ev["accuracy"],
        "eval_accuracy_no_image": blank["accuracy"],
        "eval_accuracy_per_type": ev["per_type"],
        "eval_accuracy_no_image_per_type": blank["per_type"],
        "eval_examples": ev["examples"],
        "eval_questions": ev["n"],
        "train_samples_per_second": sum(m["samples"] for m in stage_metrics) / sum(m["seconds"] for m in stage_metrics),
        "stages": stage_metrics,
        "final_loss": stage_metrics[-1]["final_loss"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
