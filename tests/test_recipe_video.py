"""recipes/llava_video.py's embedded video demo end to end on a tiny data size: clips written with PyAV, the
shipped demo config trained a few steps on them, metrics in order / shuffled / one frame per question type, and
the saved model exported to transformers' LlavaNextVideoForConditionalGeneration with `vlmkit export`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPES = {"horizontal", "vertical", "first", "bounces"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import llava_video
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("video_demo") / "run"
    llava_video.main(["--output-dir", str(out), "--demo-train-clips", "8", "--demo-eval-clips", "4", "--cpu",
                      "stages.finetune.max_steps=2", "stages.finetune.global_batch_size=4",
                      "stages.finetune.per_device_batch_size=4", "train.log_with=null", "train.log_every=1"])
    return out


def test_video_demo_writes_metrics_for_each_variant(demo_run):
    m = json.loads((demo_run / "metrics.json").read_text())
    for v in ("ordered", "shuffled", "one"):
        assert 0.0 <= m[f"accuracy_{v}"] <= 1.0
        assert set(m[f"accuracy_{v}_per_type"]) == TYPES  # 4 eval clips: one of each type
    assert m["eval_questions"] == 4 and len(m["examples"]) == 4
    assert [s["steps"] for s in m["stages"]] == [2]
    assert m["train_samples_per_second"] > 0 and m["wall_seconds"] > 0
    data = demo_run / "data"
    assert len(list((data / "clips").glob("*.mp4"))) == 12
    assert len(json.loads((data / "eval_shuffled.json").read_text())) == 4


def test_video_demo_tokenizer_holds_the_words_and_the_video_token(demo_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_run / "tokenizer")
    assert len(tok("<video>", add_special_tokens=False)["input_ids"]) == 1
    rec = json.loads((demo_run / "data" / "eval.json").read_text())[0]
    text = rec["conversations"][0]["value"].split("\n", 1)[1] + " " + rec["conversations"][1]["value"]
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_video_demo_model_exports_to_llava_next_video(demo_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlmkit.cli", "export", str(demo_run / "model"), str(tmp_path / "hf")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llava_next_video"
    assert cfg["spatial_pool_mode"] == "average" and cfg["spatial_pool_stride"] == 2
