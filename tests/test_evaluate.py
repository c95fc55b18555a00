"""Evaluation: VQA-style normalisation, per-sample reports, and sharding over processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from vlmkit.evaluate import evaluate, markdown_table, normalize_answer, write_report


@pytest.mark.parametrize("a,b", [("Two.", "2"), ("The red circle!", "red  circle"), ("none", "0"), ("Yes", "yes")])
def test_normalize_answer_matches_vqa_style(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_answer_keeps_real_differences():
    assert normalize_answer("red circle") != normalize_answer("red square")
    assert normalize_answer("two") != normalize_answer("three")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    recs = []
    for i in range(7):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(d / f"{i}.png")
        recs.append({"id": f"q{i}", "type": "color" if i % 2 else "count", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]})
    (d / "eval.json").write_text(json.dumps(recs))
    return d / "eval.json"


def test_evaluate_reports_every_sample(vlm, eval_file, tmp_path):
    res = evaluate(vlm, str(eval_file), max_new_tokens=3, progress=False)
    assert res["n"] == 7 and [r["id"] for r in res["samples"]] == [f"q{i}" for i in range(7)]
    for r in res["samples"]:  # the scores are what the answers say
        assert r["exact"] == (r["answer"] == "red") and r["normalized"] == (normalize_answer(r["answer"]) == "red")
    assert res["accuracy"] == sum(r["exact"] for r in res["samples"]) / 7
    assert set(res["per_type"]) == {"color", "count"}
    js, md = write_report({"images": res}, tmp_path)
    assert json.load(open(js))["images"]["n"] == 7
    assert open(md).read() == markdown_table({"images": res}) and "| images | 7 |" in open(md).read()


def test_eval_on_two_processes_equals_one(vlm, eval_file, tmp_path):
    """`accelerate launch` with 2 gloo processes: each answers a shard, the report is the same."""
    from conftest import ACCELERATE_LAUNCH, launch_env

    vlm.save_pretrained(tmp_path / "model")
    env = launch_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    base = ["-m", "vlmkit.cli", "eval", str(tmp_path / "model"), "--data", str(eval_file), "--max-new-tokens", "3",
            "--cpu"]
    p = subprocess.run([sys.executable, *base, "--output-dir", str(tmp_path / "one")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no"]  # standalone rendezvous (conftest): no port is picked and handed on
    p = subprocess.run(launch + base + ["--output-dir", str(tmp_path / "two")], env=env, capture_output=True,
                       text=True, timeout=300, start_new_session=True)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.load(open(tmp_path / "one" / "eval.json"))["images"]
    two = json.load(open(tmp_path / "two" / "eval.json"))["images"]
    assert two["samples"] == one["samples"] and two["accuracy"] == one["accuracy"]


def test_limit_takes_the_first_n_samples(vlm, eval_file):
    res = evaluate(vlm, str(eval_file), max_new_tokens=3, progress=False, limit=3)
    assert res["n"] == 3 and [r["id"] for r in res["samples"]] == ["q0", "q1", "q2"]
    assert evaluate(vlm, str(eval_file), max_new_tokens=3, progress=False, limit=100)["n"] == 7
    with pytest.raises(ValueError, match="limit must be a positive number of samples, got 0"):
        evaluate(vlm, str(eval_file), limit=0)


def test_limit_applies_to_the_whole_set_across_processes(vlm, eval_file, monkeypatch):
    """With 2 processes and --limit 3, the two shards together are the first 3 samples (2 + 1), not 3 each."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda rows: rows)  # each rank's own rows
    shards = []
    for rank in (0, 1):
        acc = type("Acc", (), {"process_index": rank, "num_processes": 2})()
        shards.append([r["id"] for r in evaluate(vlm, str(eval_file), max_new_tokens=3, progress=False,
                                                 accelerator=acc, limit=3)["samples"]])
    assert shards == [["q0"], ["q1", "q2"]]


def test_eval_cli_limit(vlm, eval_file, tmp_path):
    from vlmkit.cli import main

    vlm.save_pretrained(tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--data", str(eval_file), "--max-new-tokens", "2", "--limit", "2",
                 "--cpu", "--output-dir", str(tmp_path / "out")]) == 0
    assert [r["id"] for r in json.load(open(tmp_path / "out" / "eval.json"))["images"]["samples"]] == ["q0", "q1"]
