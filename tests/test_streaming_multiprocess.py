"""`data.streaming` and `data.group_by_modality_length` on 2 real processes (accelerate launch --cpu, gloo).

Both loaders shard themselves (each process draws only its own micro-batches; accelerate does not prepare
them). Here `vlmkit train` runs on 2 CPU processes and the tests read what was trained: train.log_samples writes
every optimizer step's sample ids of both processes (samples.jsonl: per step, [rank 0's ids, rank 1's ids], each
the ids of its `accum` micro-batches in order). They check: every sample trained once per pass, no sample on two
processes in one round, both processes end (no hang) with bit-identical weights (what the main process saved, too),
and a run stopped by SIGTERM part-way and started again trains the same samples with the same losses as an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import ACCELERATE_LAUNCH, launch_env

ROOT = Path(__file__).resolve().parent.parent
N_IMAGE, N_TEXT = 8, 4  # 12 samples: 3 rounds (streaming) / 3 megabatches (grouped) of 2 processes x 2
MICRO, ACCUM, STEPS = 2, 2, 5  # global batch 8 = 2 per device x 2 processes x 2 accumulation steps
TIMEOUT = 180  # a hang fails the test instead of stalling the suite

# Launched by accelerate on each process: `vlmkit train`, with the loop's finish_stage wrapped to write the
# digest of every weight this process holds (after the last step, while the engine still holds the model).
RANK_WEIGHTS = """
import hashlib, json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlmkit.training import loop
real = loop.finish_stage

def finish_stage(accelerator, job, last, on_finish):
    raw = accelerator.unwrap_model(job.model)
    digest = {k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
              for k, v in raw.state_dict().items()}
    out = Path(sys.argv[2]).parent / "out" / f"weights-rank{accelerator.process_index}.json"
    out.write_text(json.dumps({"world": accelerator.num_processes, "digest": digest}))
    return real(accelerator, job, last, on_finish)

loop.finish_stage = finish_stage
from vlmkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def mp_data(tmp_path_factory):
    """12 LLaVA samples, every third text-only (ids s0..s11), as JSONL (streamed) and JSON (map-style)."""
    d = tmp_path_factory.mktemp("mp_data")
    recs = []
    for i in range(N_IMAGE + N_TEXT):
        rec = {"id": f"s{i}", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?" if i % 3 else "How many shapes are there?"},
            {"from": "gpt", "value": " ".join(["red", "green", "blue", "two"][: i % 4 + 1])}]}
        if i % 3:
            Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(d / f"{i}.png")
            rec["image"] = f"{i}.png"
        recs.append(rec)
    (d / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "d.json").write_text(json.dumps(recs))
    # 14 records: the last round (s12, s13) is rank 0's only; rank 1 starts its next pass there
    odd = recs + [dict(recs[1], id="s12"), dict(recs[2], id="s13")]
    (d / "odd.jsonl").write_text("\n".join(json.dumps(r) for r in odd) + "\n")
    return d, recs


def write_config(folder: Path, encoder: str, llm: str, data: dict, steps: int = STEPS) -> str:
    """One stage, connector + whole LLM trained (DDP all-reduces both), a checkpoint every 2 steps."""
    cfg = {"model": {"encoder": {"name": "clip", "path": encoder}, "connector": {"name": "mlp2x_gelu"},
                     "llm": {"path": llm}},
           "stages": [{"name": "s", "train": {"connector": "full", "llm": "full"}, "lr": 1e-2, "max_steps": steps,
                       "global_batch_size": MICRO * 2 * ACCUM, "per_device_batch_size": MICRO,
                       "warmup_ratio": 0.0, "data": {"max_length": 128, **data}}],
           "train": {"output_dir": str(folder / "out"), "log_with": None, "log_every": 1, "save_steps": 2,
                     "seed": 0, "log_samples": True}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "train_ranks.py").write_text(RANK_WEIGHTS)
    return str(folder / "run.yaml")


def start(cfg: str) -> subprocess.Popen:
    """`vlmkit train cfg --cpu` on 2 processes (torchrun through --multi_gpu; vlmkit's --cpu: gloo), standalone
    rendezvous, in a process group of its own (as tests/test_distributed.py launches)."""
    env = launch_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                     PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("VLMKIT_DEBUG", None)
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(Path(cfg).parent / "train_ranks.py"), "train", cfg, "--cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        text, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not end within {TIMEOUT} s (a hang): {text[-3000:]}")
    return text


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def trace(out: Path) -> tuple[list, list]:
    """(step, loss) of every step, and every step's [rank 0's ids, rank 1's ids]."""
    return ([(r["step"], r["loss"]) for r in records(out / "log.jsonl")],
            [r["ids"] for r in records(out / "samples.jsonl")])


def rounds(ids: list) -> list[list[str]]:
    """Every step's ids as rounds: micro-batch k of rank 0 followed by micro-batch k of rank 1."""
    return [step[0][k * MICRO:(k + 1) * MICRO] + step[1][k * MICRO:(k + 1) * MICRO]
            for step in ids for k in range(ACCUM)]


def check_weights_in_sync(out: Path) -> None:
    """Both processes hold bit-identical weights at the end, and the saved model is exactly those weights."""
    from safetensors.torch import load_file

    r0, r1 = (json.loads((out / f"weights-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"], [k for k in r0["digest"] if r0["digest"][k] != r1["digest"].get(k)][:5]
    saved = load_file(str(out / "model" / "model.safetensors"))
    common = [k for k in saved if k in r1["digest"]]
    assert len(common) > 10 and any(k.startswith("connector.") for k in common)
    for k in common:
        got = hashlib.sha256(saved[k].float().contiguous().numpy().tobytes()).hexdigest()
        assert got == r1["digest"][k], k


@pytest.fixture(scope="module")
def runs(mp_data, encoder_dirs, llm_dir, tmp_path_factory):
    """The two uninterrupted 2-process runs (streaming; grouped), started together: {name: (folder, output)}."""
    d, _ = mp_data
    root = tmp_path_factory.mktemp("mp_runs")
    cfgs = {"stream": write_config(root / "stream", encoder_dirs["clip"], llm_dir,
                                   {"path": str(d / "d.jsonl"), "streaming": True, "num_workers": 0}),
            "grouped": write_config(root / "grouped", encoder_dirs["clip"], llm_dir,
                                    {"path": str(d / "d.json"), "group_by_modality_length": True, "num_workers": 0}),
            "stream_odd": write_config(root / "stream_odd", encoder_dirs["clip"], llm_dir,
                                       {"path": str(d / "odd.jsonl"), "streaming": True, "num_workers": 0})}
    procs = {k: start(c) for k, c in cfgs.items()}
    return {k: (Path(cfgs[k]).parent / "out", finish(p), p.returncode) for k, p in procs.items()}


def test_streaming_on_two_processes_trains_each_sample_once_per_pass(runs, mp_data):
    out, text, rc = runs["stream"]
    assert rc == 0, text[-4000:]
    _, recs = mp_data
    log, ids = trace(out)
    assert [s for s, _ in log] == list(range(1, STEPS + 1)) and len(ids) == STEPS
    assert all(len(step) == 2 and len(step[0]) == len(step[1]) == MICRO * ACCUM for step in ids)
    # round k of the stream (records 4k..4k+3, the stream read again after its end): rank 0 trains the first two,
    # rank 1 the other two, in order; so each pass trains every record once, and no round has an id on both ranks
    order = [r["id"] for r in recs]
    stream = order * 4
    assert rounds(ids) == [stream[4 * k:4 * k + 4] for k in range(STEPS * ACCUM)]
    check_weights_in_sync(out)


def test_a_stream_whose_last_round_is_partial_keeps_each_process_on_its_own_share(runs):
    """14 records in rounds of 4: the last round (s12, s13) is rank 0's alone, so rank 1 starts its next pass one
    micro-batch earlier (no process waits for another: no hang). Each process still reads exactly its own share of
    every pass, so no record is trained by both processes and a pass trains each record once."""
    out, text, rc = runs["stream_odd"]
    assert rc == 0, text[-4000:]
    log, ids = trace(out)
    assert [s for s, _ in log] == list(range(1, STEPS + 1))
    share = [["s0", "s1", "s4", "s5", "s8", "s9", "s12", "s13"], ["s2", "s3", "s6", "s7", "s10", "s11"]]
    for rank in (0, 1):
        got = [i for step in ids for i in step[rank]]
        assert len(got) == STEPS * ACCUM * MICRO
        assert got == (share[rank] * 4)[:len(got)], rank
    assert sorted(share[0] + share[1]) == sorted(f"s{i}" for i in range(14))
    check_weights_in_sync(out)


def test_group_by_modality_length_on_two_processes_trains_each_sample_once_per_epoch(runs, mp_data):
    from vlmkit.data.dataset import ConversationDataset
    from vlmkit.data.sampler import ModalityLengthBatchSampler

    out, text, rc = runs["grouped"]
    assert rc == 0, text[-4000:]
    d, recs = mp_data
    log, ids = trace(out)
    assert [s for s, _ in log] == list(range(1, STEPS + 1)) and len(ids) == STEPS
    with_image = {r["id"] for r in recs if "image" in r}
    for step in ids:  # every micro-batch of each process: one modality
        for rank in step:
            assert len(rank) == MICRO * ACCUM
            for k in range(ACCUM):
                assert len({i in with_image for i in rank[k * MICRO:(k + 1) * MICRO]}) == 1, step
    # the megabatches in the sampler's order (train.seed 0), rank r training micro-batch r of each
    sampler = ModalityLengthBatchSampler(ConversationDataset(str(d / "d.json"), None).modality_lengths(), MICRO,
                                         world=2, seed=0)
    want = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epoch_rounds = [[recs[i]["id"] for part in mega for i in part] for mega in sampler.megabatches()]
        assert sorted(i for r in epoch_rounds for i in r) == sorted(r["id"] for r in recs)  # each once an epoch
        want += epoch_rounds
    assert rounds(ids) == want[:STEPS * ACCUM]
    check_weights_in_sync(out)


def stop_at(proc: subprocess.Popen, log: Path, step: int) -> str:
    """SIGTERM to the launcher's process group once `step` is logged (the agent passes it on to both ranks)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(r.get("step") == step for r in records(log) if r.get("loss") is not None):
            os.killpg(proc.pid, signal.SIGTERM)
            return finish(proc)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"step {step} was not logged within {TIMEOUT} s")


@pytest.mark.parametrize("kind,data", [
    ("stream", {"file": "d.jsonl", "streaming": True, "num_workers": 1}),  # 1 worker: the same stream
    ("grouped", {"file": "d.json", "group_by_modality_length": True, "num_workers": 0}),
])
def test_two_processes_stopped_by_sigterm_resume_like_an_uninterrupted_run(runs, mp_data, encoder_dirs, llm_dir,
                                                                           tmp_path, kind, data):
    ref, text, rc = runs[kind]
    assert rc == 0, text[-4000:]
    d, _ = mp_data
    data = {**{k: v for k, v in data.items() if k != "file"}, "path": str(d / data["file"])}
    cfg = write_config(tmp_path / kind, encoder_dirs["clip"], llm_dir, data, steps=STEPS)
    out = tmp_path / kind / "out"
    text = stop_at(start(cfg), out / "log.jsonl", 1)
    stopped = records(out / "log.jsonl")[-1]["step"]
    # the signal reaches both ranks during step 1 or 2: both stop after the same step, with its checkpoint
    assert 1 <= stopped < STEPS and f"stopped by SIGTERM after step {stopped}" in text, text[-3000:]
    assert (out / "checkpoints" / "s" / f"checkpoint-{stopped}").is_dir()
    again = start(cfg)
    text = finish(again)
    assert again.returncode == 0 and f"resuming: stage s at step {stopped}/{STEPS}" in text, text[-3000:]
    log, ids = trace(out)
    ref_log, ref_ids = trace(ref)
    assert ids == ref_ids  # the same samples at every step, on both processes
    assert [s for s, _ in log] == [s for s, _ in ref_log] == list(range(1, STEPS + 1))
    # gloo's all-reduce of the same gradients in the same order: the same bits, or a last-bit difference
    assert [loss for _, loss in log] == pytest.approx([loss for _, loss in ref_log], rel=1e-6, abs=1e-7)
    check_weights_in_sync(out)


# ---- the data-loader worker under a process-group SIGTERM (what the num_workers 1 run above met) ----------------
WORKER_PROG = """
import os, signal, subprocess, sys, time
from torch.utils.data import DataLoader, IterableDataset
from vlmkit.training import preempt

class Slow(IterableDataset):
    def __iter__(self):
        for i in range(100):
            time.sleep(0.01)
            yield i

with preempt.handlers():
    init = {"worker_init_fn": preempt.worker_init} if sys.argv[1] == "1" else {}
    it = iter(DataLoader(Slow(), batch_size=None, num_workers=1, **init))
    got = [next(it)]
    group = os.getpgid(0)  # SIGTERM to the whole group, sent from outside it (as the elastic agent does)
    subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({group}, signal.SIGTERM)"],
                   start_new_session=True, check=True)
    time.sleep(0.5)
    got += [next(it), next(it)]
    print("REQUESTED", preempt.requested(), "GOT", got, flush=True)
"""


@pytest.mark.parametrize("with_init", [True, False])
def test_a_loader_worker_survives_a_process_group_sigterm(tmp_path, with_init):
    """torch's worker dies on a SIGTERM not sent by its parent; preempt.worker_init keeps it serving, so the main
    process reaches its step boundary (and its loader still ends the worker: the program exits)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", WORKER_PROG, str(int(with_init))], env=env, capture_output=True,
                       text=True, timeout=60, start_new_session=True)
    if with_init:
        assert p.returncode == 0, p.stderr[-2000:]
        assert "REQUESTED 15 GOT [0, 1, 2]" in p.stdout
    else:  # torch's own handler: the batch after the signal fails
        assert p.returncode == 1 and "DataLoader worker" in p.stderr and "Terminated" in p.stderr, p.stderr[-2000:]
