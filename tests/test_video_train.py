"""Training with video samples: two stages (connector, then LoRA on the LLM) over a JSON mixing video, image and
text samples, packed, learns and resumes exactly; FLOP accounting counts video frames through the encoder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_streaming import interrupted_then_resumed, trace
from test_video_model import video_config
from vlmkit.config import DataConfig, RunConfig, StageConfig, TrainConfig
from vlmkit.experiments import video_demo as D
from vlmkit.training.batches import window_counts
from vlmkit.training.flops import FlopCounter
from vlmkit.training.run import run

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220)}


def write_mixed(root) -> str:
    """12 samples: videos of a coloured square moving right or left (answer: the direction), images (answer: the
    colour) and text-only questions, in one JSON."""
    recs = []
    for i in range(12):
        kind = ("video", "image", "text")[i % 3]
        color = ["red", "blue"][i // 3 % 2]
        if kind == "video":
            right = i // 6 == 0
            xs = [2 + 2 * t for t in range(6)]
            frames = [D.draw(16, [(color, "square", x if right else 14 - x - 4, 6, 4)]) for x in xs]
            D.write_mp4(root / f"v{i}.mp4", frames, rate=4)
            recs.append({"id": f"v{i}", "video": f"v{i}.mp4", "conversations": [
                {"from": "human", "value": "<video>\nWhere does it move?"},
                {"from": "gpt", "value": "right" if right else "left"}]})
        elif kind == "image":
            Image.fromarray(np.full((16, 16, 3), COLORS[color], np.uint8)).save(root / f"i{i}.png")
            recs.append({"id": f"i{i}", "image": f"i{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": color}]})
        else:
            recs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi"},
                                                          {"from": "gpt", "value": "hi"}]})
    (root / "mixed.json").write_text(json.dumps(recs))
    return str(root / "mixed.json")


LORA = {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def video_run(tok_dir, path: str, out, steps: int = 8, save_steps: int = 0, llm=LORA, lr: float = 1e-2,
              **data) -> RunConfig:
    d = dict(path=path, max_length=128, num_workers=0, max_frames=3, pack=True, **data)
    stages = [StageConfig(name="align", train={"connector": "full"}, data=DataConfig(**d), lr=1e-2, max_steps=2,
                          global_batch_size=4, per_device_batch_size=2, warmup_ratio=0.0),
              StageConfig(name="tune", train={"connector": "full", "llm": llm},
                          data=DataConfig(**d), lr=lr, max_steps=steps, global_batch_size=4,
                          per_device_batch_size=2, warmup_ratio=0.0)]
    return RunConfig(model=video_config(tok_dir, pool="average"), stages=stages,
                     train=TrainConfig(output_dir=str(out), log_with=None, log_every=1, save_steps=save_steps,
                                       log_samples=True, save_models=False, seed=0))


def test_staged_packed_training_on_mixed_video_data_learns(tok_dir, tmp_path):
    path = write_mixed(tmp_path)
    _, _, metrics = run(video_run(tok_dir, path, tmp_path / "run", steps=10, llm="full", lr=3e-3), cpu=True)
    log, ids = trace(tmp_path / "run")
    losses = [loss for _, loss in log]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])  # it learns (4.25 -> 3.40 here)
    seen = {i for step in ids for mb in step for i in mb}
    assert {"v0", "v3", "v6", "v9", "i1", "t2"} <= seen  # every modality trained on, in packed batches
    assert not any(m["skipped"] for m in metrics)


def test_lora_video_training_resumes_exactly(tok_dir, tmp_path, monkeypatch):
    path = write_mixed(tmp_path)
    run(video_run(tok_dir, path, tmp_path / "ref", steps=4, save_steps=1), cpu=True)
    out = tmp_path / "resumed"
    cfg = video_run(tok_dir, path, out, steps=4, save_steps=1)
    retrained = interrupted_then_resumed(cfg, at=4, monkeypatch=monkeypatch)
    assert 0 < retrained < 6  # stopped part-way (2 + 4 steps in all), continued from its checkpoint
    assert trace(out) == trace(tmp_path / "ref")


def test_flops_count_video_frames_as_encoder_tiles(tok_dir):
    import torch

    from vlmkit import VLM

    counter = FlopCounter.for_model(VLM.from_config(video_config(tok_dir)))

    class One:
        num_processes = 1
    base = {"lengths": [20, 30], "num_labels": 5, "ids": ["a", "b"], "pixel_values": torch.zeros(1, 3, 16, 16)}
    frames = dict(base, pixel_values_videos=torch.zeros(6, 3, 16, 16))
    enc, conn = counter.tile_forward()
    diff = window_counts(One(), [frames], counter)["flops"] - window_counts(One(), [base], counter)["flops"]
    assert enc > 0 and diff == 6 * (counter.mult_enc * enc + counter.mult_conn * conn)


def _zero3_ready() -> str | None:
    import torch

    from vlmkit.extras import available

    if not torch.cuda.is_available():
        return "ZeRO-3 needs a CUDA GPU (run on the GPU machine: see BENCHMARKS.md)"
    if not available("deepspeed"):
        return "needs deepspeed (pip install 'vlmkit[deepspeed]')"
    return None


@pytest.mark.skipif(_zero3_ready() is not None, reason=str(_zero3_ready()))
def test_zero3_trains_mixed_video_image_text_batches(tok_dir, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/zero3.yaml` (one process per GPU, at most 2) over the
    mixed JSON, one sample per micro-batch: batches of video, of images and of text only meet the partitioned
    model (on 2 GPUs one rank's batch has a video when the other's has none). Both stages finish, every modality is
    trained on, the consolidated model loads whole, and stage 2 changed the connector and the LLM."""
    import subprocess
    import sys

    import torch
    import yaml

    from conftest import ACCELERATE_LAUNCH, launch_env
    from vlmkit import VLM
    from vlmkit.config import to_dict

    world = min(2, torch.cuda.device_count())
    path = write_mixed(tmp_path)
    cfg = video_run(tok_dir, path, tmp_path / "run", steps=6, llm="full", lr=3e-3)
    cfg.train.save_models = True
    for s in cfg.stages:
        s.per_device_batch_size, s.global_batch_size = 1, 2
        s.data.pack = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    root = Path(__file__).resolve().parent.parent
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(root / "recipes" / "accelerate" / "zero3.yaml"),
           "--num_processes", str(world), "-m", "vlmkit.cli", "train", str(tmp_path / "run.yaml")]
    p = subprocess.run(cmd, env=launch_env(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"), cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    log, ids = trace(tmp_path / "run")
    assert len(log) == 8 and all(np.isfinite([loss for _, loss in log]))
    def flat(x):
        return [x] if isinstance(x, str) else [i for y in x for i in flat(y)]
    seen = set(flat(ids))
    assert any(i.startswith("v") for i in seen) and any(i.startswith("i") for i in seen)
    assert any(i.startswith("t") for i in seen)
    final = VLM.from_pretrained(tmp_path / "run" / "model")
    aligned = VLM.from_pretrained(tmp_path / "run" / "align")
    for part in ("connector", "llm"):
        a, b = dict(aligned.get_submodule(part).named_parameters()), dict(final.get_submodule(part).named_parameters())
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), part
