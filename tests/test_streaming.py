"""Training over the new data paths: a parquet file of TRL-layout samples; `data.streaming` (each process its own
share of the stream, resumed at the exact stream position); `data.group_by_modality_length` (resumed exactly)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import datasets
import pytest
import torch

from conftest import model_config
from test_data_formats import SAMPLES, typed_dataset
from vlmkit.config import DataConfig, RunConfig, StageConfig, TrainConfig
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.processor import collate
from vlmkit.data.sampler import ModalityLengthBatchSampler
from vlmkit.training import loop, preempt
from vlmkit.training.batches import make_dataset, make_loader
from vlmkit.training.run import run
from PIL import Image

N = 14  # samples: a stream of 14 is 3.5 steps of 4: the runs below pass its end


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory):
    """N LLaVA samples (every third text-only) as JSONL, and the same as a parquet file with embedded images."""
    d = tmp_path_factory.mktemp("stream")
    recs = []
    for i in range(N):
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(d / f"{i}.png")
        q = "<image>\nWhat color is the shape?" if i % 3 else "hello world"
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red " * (i % 4 + 1)}]}
        if i % 3:
            rec["image"] = [f"{i}.png"]
        recs.append(rec)
    (d / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d, recs


def stage_run(encoder_dirs, llm_dir, out: Path, data: DataConfig, steps: int = 6, save_steps: int = 2) -> RunConfig:
    st = StageConfig(name="s", train={"connector": "full"}, data=data, lr=1e-2, max_steps=steps,
                     global_batch_size=4, per_device_batch_size=2, warmup_ratio=0.0)
    return RunConfig(model=model_config(encoder_dirs["clip"], llm_dir), stages=[st],
                     train=TrainConfig(output_dir=str(out), log_with=None, log_every=1, save_steps=save_steps,
                                       log_samples=True, save_models=False))


def trace(out: Path) -> tuple[list, list]:
    log = [(r["step"], round(r["loss"], 5)) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    ids = [r["ids"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]
    return log, ids


def interrupted_then_resumed(cfg: RunConfig, at: int, monkeypatch) -> int:
    """Stop the run at step `at` as SIGTERM would (a checkpoint, then Preempted), then run the same config again;
    the steps the second run trained."""
    steps = []

    def stop_at(accelerator=None):
        steps.append(1)
        return signal.SIGTERM if len(steps) == at else None

    monkeypatch.setattr(loop.preempt, "requested", stop_at)
    with pytest.raises(preempt.Preempted):
        run(cfg, cpu=True)
    monkeypatch.undo()
    real, again = loop.train_step, []
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: again.append(1) or real(*a, **k))
    run(cfg, cpu=True)
    monkeypatch.undo()
    return len(again)


def test_training_on_a_parquet_file_of_trl_samples(encoder_dirs, llm_dir, tmp_path):
    from test_data_formats import COLORS

    for i, c in enumerate(COLORS):
        Image.new("RGB", (16 + 2 * i, 16), c).save(tmp_path / f"{i}.png")
    typed_dataset(tmp_path).to_parquet(str(tmp_path / "trl.parquet"))
    data = DataConfig(path=str(tmp_path / "trl.parquet"), max_length=128, num_workers=0)
    _, _, metrics = run(stage_run(encoder_dirs, llm_dir, tmp_path / "run", data, steps=3, save_steps=0), cpu=True)
    log, ids = trace(tmp_path / "run")
    assert [s for s, _ in log] == [1, 2, 3] and all(loss == loss and loss > 0 for _, loss in log)
    assert metrics[0]["samples"] == 10 and not metrics[0]["skipped"]  # 2 epochs of micro-batches 2, 2, 1
    assert {i for step in ids for i in step[0]} == {s[0] for s in SAMPLES}  # every sample of the file trained on


def test_streaming_reads_in_order_and_resumes_at_the_exact_stream_position(encoder_dirs, llm_dir, stream_data,
                                                                          tmp_path, monkeypatch):
    d, recs = stream_data
    data = DataConfig(path=str(d / "d.jsonl"), max_length=128, num_workers=0, streaming=True)
    run(stage_run(encoder_dirs, llm_dir, tmp_path / "ref", data), cpu=True)
    log, ids = trace(tmp_path / "ref")
    order = [r["id"] for r in recs]
    stream = (order * 2)[:6 * 4]  # 6 steps of 4: the stream, then its start again (the last round: 2 samples)
    expect, k = [], 0
    for _ in range(6):
        expect.append([stream[k:k + 4]])
        k += 4
    assert ids[:3] == expect[:3]  # steps 1-3: r0..r11
    assert ids[3] == [["r12", "r13", "r0", "r1"]]  # the stream ended after r13 (half a micro-batch round...)
    out = tmp_path / "resumed"
    assert interrupted_then_resumed(stage_run(encoder_dirs, llm_dir, out, data), at=3, monkeypatch=monkeypatch) == 3
    assert (out / "checkpoints" / "s").exists()
    assert trace(out) == (log, ids)


def test_each_process_and_worker_reads_its_own_share_of_the_stream(stream_data, processor, tmp_path, monkeypatch):
    d, recs = stream_data
    ds = datasets.Dataset.from_list([dict(r, image=[{"bytes": (d / p).read_bytes(), "path": None}
                                                    for p in r.get("image", [])]) for r in recs])
    ds = ds.cast_column("image", datasets.List(datasets.Image()))
    ds.to_parquet(str(tmp_path / "s.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    ref = ConversationDataset(str(d / "d.jsonl"), processor)
    pad = processor.tokenizer.pad_token_id

    def batches(data, rank, world, offset=0, n=None):
        loader = make_loader(make_dataset(data, processor), data, 2, pad, rank, world)
        loader.dataset.seek(0, offset)
        return list(loader)[:n]

    for path in (str(d / "d.jsonl"), str(tmp_path / "s.parquet"), str(tmp_path / "saved")):
        data = DataConfig(path=path, image_folder=str(d), max_length=128, num_workers=0, streaming=True)
        shares = [batches(data, rank, 2) for rank in (0, 1)]
        # round k: rank r takes stream samples [4k + 2r, 4k + 2r + 2); the last round (2 samples) is rank 0's only
        assert [b["ids"] for b in shares[0]] == [[f"r{4 * k}", f"r{4 * k + 1}"] for k in range(4)]
        assert [b["ids"] for b in shares[1]] == [[f"r{4 * k + 2}", f"r{4 * k + 3}"] for k in range(3)]
        for k, b in enumerate(shares[1]):
            want = collate([ref[4 * k + 2], ref[4 * k + 3]], pad)
            assert torch.equal(b["input_ids"], want["input_ids"]) and torch.equal(b["pixel_values"], want["pixel_values"])
        assert [b["ids"] for b in batches(data, 1, 2, offset=2)] == [["r10", "r11"]]  # seek: after 2 rounds
    data = DataConfig(path=str(d / "d.jsonl"), max_length=128, num_workers=2, streaming=True)
    assert [b["ids"] for b in batches(data, 0, 1)] == [[f"r{2 * k}", f"r{2 * k + 1}"] for k in range(7)]


def test_a_hub_stream_is_asked_for_as_a_stream(stream_data, processor, monkeypatch):
    d, recs = stream_data
    calls = []

    def fake(*args, **kw):
        calls.append((args, kw))
        return datasets.Dataset.from_list([dict(r, image=r.get("image", [])) for r in recs[:4]]).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = DataConfig(path="someorg/big-set", image_folder=str(d), max_length=128, num_workers=0, streaming=True)
    loader = make_loader(make_dataset(data, processor), data, 2, processor.tokenizer.pad_token_id)
    assert [b["ids"] for b in loader] == [["r0", "r1"], ["r2", "r3"]]
    assert calls == [(("someorg/big-set",), {"split": "train", "streaming": True})]


def test_group_by_modality_length_trains_single_modality_batches_and_resumes_exactly(encoder_dirs, llm_dir,
                                                                                    stream_data, tmp_path, monkeypatch):
    d, recs = stream_data
    data = DataConfig(path=str(d / "d.jsonl"), max_length=128, num_workers=0, group_by_modality_length=True)
    run(stage_run(encoder_dirs, llm_dir, tmp_path / "ref", data, steps=6), cpu=True)
    log, ids = trace(tmp_path / "ref")
    ds = ConversationDataset(str(d / "d.jsonl"), None)
    sampler = ModalityLengthBatchSampler(ds.modality_lengths(), 2, 1, 0, seed=0)  # train.seed 0
    drawn = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn += [[recs[i]["id"] for i in b] for b in sampler]
    micro = [m for step in ids for m in step[0]]
    assert micro == [i for b in drawn for i in b][:len(micro)]  # the sampler's batches, in its order
    with_image = {r["id"] for r in recs if "image" in r}
    assert all(len({i in with_image for i in b}) == 1 for b in drawn)
    assert sorted(i for b in drawn[:len(sampler)] for i in b) == sorted(r["id"] for r in recs)
    out = tmp_path / "resumed"
    assert interrupted_then_resumed(stage_run(encoder_dirs, llm_dir, out, data, steps=6), at=4,
                                    monkeypatch=monkeypatch) == 2  # continued after step 4
    assert trace(out) == (log, ids)
