"""benchmarks/train_throughput.py runs vlmkit's training step end to end (tiny shape, CPU, 2 steps)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"
PEER_FIELDS = ("impl", "llm", "stage", "batch", "gc", "lengths", "samples_s", "real_tokens_s", "pad_fraction",
               "tflops", "mfu", "peak_mem_gib")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_run_prints_the_peer_fields(bench, capsys):
    res = bench.main(["--device", "cpu", "--llm", "tiny", "--stage", "2", "--batch", "2", "--steps", "2",
                      "--warmup", "1", "--gc"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(line)
    assert out == res
    for key in PEER_FIELDS:
        assert key in out, key
    assert out["impl"] == "vlmkit" and out["llm"] == "tiny" and out["lengths"] == "workload"
    assert out["samples_s"] > 0 and out["real_tokens_s"] > 0 and 0 <= out["pad_fraction"] < 1
    assert out["loss"] == out["loss"]  # finite (the step raises on a non-finite loss)


def test_workload_and_flops_match_the_peer(bench):
    """The script's fallback copies agree with ../shared/bench (the versions it imports when present)."""
    if bench.SOURCE == "own copy":
        pytest.skip("../shared/bench is not here: nothing to compare the copies with")
    assert bench._text_lengths(256, 2) == bench.text_lengths(256, 2)
    assert bench._text_lengths(256, 1) == bench.text_lengths(256, 1)
    v = SimpleNamespace(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24)
    t = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064)
    cfg = SimpleNamespace(vision_config=v, text_config=t)
    for stage in (1, 2):
        assert bench._flops_per_sample(cfg, 300, stage) == bench.flops_per_sample(cfg, 300, stage)


def test_lora_needs_stage_2(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--lora", "--stage", "1"])


def test_tiny_cpu_packed_run(bench, capsys):
    """--pack (vlmkit's packing collate, varlen attention) with selective checkpointing: same fields, pad-free,
    and the padded-vs-packed loss check passes."""
    res = bench.main(["--device", "cpu", "--llm", "tiny", "--stage", "2", "--batch", "3", "--steps", "1",
                      "--warmup", "1", "--gc", "--gc-every", "2", "--pack", "--attn", "varlen"])
    for key in PEER_FIELDS + ("pack", "gc_every"):
        assert key in res, key
    assert res["pack"] is True and res["gc_every"] == 2 and res["pad_fraction"] == 0
    assert res["pack_check_rel"] <= 1e-5
    with pytest.raises(SystemExit):
        bench.parse_args(["--gc-every", "2"])  # needs --gc
