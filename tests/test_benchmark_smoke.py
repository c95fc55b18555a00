"""benchmarks/train_throughput.py trains through `vlmkit.train.run` (and the recipe) over generated files (tiny
shape, CPU); benchmarks/step_microbench.py runs the training step alone; benchmarks/data_throughput.py runs the
training DataLoader over generated data, every tiling mode."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "step_microbench.py"
REAL = ROOT / "benchmarks" / "train_throughput.py"
PEER_FIELDS = ("impl", "llm", "stage", "batch", "gc", "lengths", "samples_s", "real_tokens_s", "pad_fraction",
               "tflops", "mfu", "peak_mem_gib")


def load_script(path: Path):
    """A benchmarks/ script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


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


def test_workload_and_flops_match_the_peer():
    """benchmarks/peer_workload.py's fallback copies agree with ../shared/bench (the versions it imports when
    present)."""
    wl = load_script(ROOT / "benchmarks" / "peer_workload.py")
    if wl.SOURCE == "own copy":
        pytest.skip("../shared/bench is not here: nothing to compare the copies with")
    assert wl._text_lengths(256, 2) == wl.text_lengths(256, 2)
    assert wl._text_lengths(256, 1) == wl.text_lengths(256, 1)
    v = SimpleNamespace(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24)
    t = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064)
    cfg = SimpleNamespace(vision_config=v, text_config=t)
    for stage in (1, 2):
        assert wl._flops_per_sample(cfg, 300, stage) == wl.flops_per_sample(cfg, 300, stage)


def test_loop_flop_count_equals_the_peers_formula(tmp_path):
    """vlmkit.flops (the training loop's MFU) counts a CLIP-shaped encoder + MLP + Llama-shaped LLM exactly as the
    peer's formula does, stage 1 (connector) and stage 2 (connector + LLM)."""
    wl = load_script(ROOT / "benchmarks" / "peer_workload.py")
    real = load_script(REAL)
    from vlmkit import VLM
    from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
    from vlmkit.flops import FlopCounter

    micro = load_script(SCRIPT)
    llm = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=False)
    vision = dict(real.VISION, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    model = VLM.from_config(ModelConfig(encoder=EncoderConfig(name="clip", config=vision, feature_layer=-2),
                                        connector=ConnectorConfig("mlp2x_gelu"),
                                        llm=LLMConfig(config=llm, tokenizer=micro.make_tokenizer(str(tmp_path)))))
    shapes = SimpleNamespace(vision_config=model.encoder.model.config, text_config=model.llm.config)
    counter = FlopCounter.for_model(model)
    for stage in (1, 2):
        model.requires_grad_(False)
        model.connector.requires_grad_(True)
        model.llm.requires_grad_(stage == 2)
        for text in (16, 300, 1472):
            got, _ = counter.with_stage(model).step([wl.IMAGE_TOKENS + text], tiles=1)
            assert got == wl.flops_per_sample(shapes, text, stage), (stage, text)


def test_real_path_tiny_cpu_run_prints_the_peer_fields(capsys):
    """Files on disk -> vlmkit.train.run (DataLoader with a worker, the loop, its log) -> the peer's fields."""
    real = load_script(REAL)
    res = real.main(["--device", "cpu", "--llm", "tiny", "--stage", "2", "--batch", "2", "--steps", "2",
                     "--warmup", "1", "--workers", "1", "--images", "3", "--vocab", "1000", "--log-with", "none"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == res
    for key in PEER_FIELDS + ("mfu_llm", "precision", "memory"):
        assert key in out, key
    assert out["path"] == "run" and out["precision"] == "fp32" and out["timed_steps"] == 2
    assert out["samples_s"] > 0 and out["real_tokens_s"] > 600 * out["samples_s"]  # 576 image tokens + text
    assert out["pad_fraction"] == 0.0 and out["loss"] == out["loss"]


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


# ---- benchmarks/data_throughput.py: the training DataLoader over generated LLaVA-format data -------------------
DATA_SCRIPT = SCRIPT.parent / "data_throughput.py"
DATA_FIELDS = ("bench", "mode", "workers", "batch", "pack", "samples", "batches", "skipped", "seconds", "samples_s",
               "images_s", "tiles_s", "images_s_per_worker", "tiles_s_per_worker", "tokens_s", "tiles_per_image",
               "image_tokens_per_sample", "text_tokens_per_sample", "workload_text_tokens_per_sample")


@pytest.fixture(scope="module")
def data_bench():
    spec = importlib.util.spec_from_file_location("data_throughput", DATA_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_files(data_bench, tmp_path_factory):
    """8 samples over 4 generated images, a 1,000-word BPE (small: seconds)."""
    return data_bench.make_dataset_files(tmp_path_factory.mktemp("data_bench"), 8, 4, 1000, seed=0)


def test_data_bench_every_mode_prints_its_fields(data_bench, capsys):
    res = data_bench.main(["--mode", "all", "--samples", "6", "--batch", "3", "--workers", "0", "--images", "3",
                           "--vocab", "1000", "--vs-train-rate", "2.0"])
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.strip().splitlines()] == res
    assert [r["mode"] for r in res] == ["none", "anyres", "internvl", "naflex"]
    for r in res:
        for key in DATA_FIELDS:
            assert key in r, (r["mode"], key)
        assert r["bench"] == "data_loader" and r["workers"] == 0 and r["batch"] == 3 and r["pack"] is False
        assert (r["samples"], r["batches"], r["skipped"]) == (6, 2, 0)  # one whole timed pass
        assert r["samples_s"] > 0 and r["images_s"] == r["samples_s"]  # one image per sample
        assert r["images_s_per_worker"] == r["images_s"]  # --workers 0: the main process does the work
        assert r["tiles_s"] == pytest.approx(r["images_s"] * r["tiles_per_image"], rel=1e-2)
        assert r["loader_vs_train"] == round(r["samples_s"] / 2.0, 2)
        assert f"{r['mode']}: loader {r['samples_s']:.2f} samples/s with 0 worker(s)" in out.err
    none, anyres, internvl, naflex = res
    assert (none["tile_px"], none["tiles_per_image"], none["image_tokens_per_sample"]) == (336, 1, 576)
    assert anyres["tile_px"] == 336 and 3 <= anyres["tiles_per_image"] <= 5  # base tile + 2..4 (LLaVA-NeXT grids)
    assert internvl["tile_px"] == 448 and internvl["encoder"] == "internvit" and 1 < internvl["tiles_per_image"] <= 13
    assert naflex["encoder"] == "siglip2" and naflex["tiles_per_image"] == 1 and naflex["image_tokens_per_sample"] <= 256


def test_data_bench_text_lengths_are_the_workloads_in_tokens(data_bench, bench_files):
    """Every generated conversation's text (BOS, system prompt, roles, turns) is exactly its workload length."""
    from vlmkit.data.conversation import encode, get_template, normalize
    from vlmkit.llm import load_tokenizer

    assert bench_files["lengths"] == [276, 225, 417, 272, 163, 334, 710, 533]  # workload.text_lengths(8, 2, seed 0)
    tok = load_tokenizer(bench_files["tokenizer"], "<image>")
    assert len(tok) == 1001  # the trained vocabulary + <image>
    records = json.loads(Path(bench_files["json"]).read_text())
    got = [len(encode(normalize(r["conversations"]), tok, get_template("vicuna_v1"), "<image>", -1, [0])[0])
           for r in records]
    assert got == bench_files["lengths"]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)


def test_data_bench_loader_yields_every_tile_and_token(data_bench, bench_files):
    """One timed pass yields each sample once, with the tiles and placeholders the published tiling gives its image
    (LLaVA-NeXT pinpoints at 336 px; InternVL 1..12 tiles + thumbnail at 448 px); packing and a worker process
    change none of it."""
    from PIL import Image

    from vlmkit import tiling as T

    folder = Path(bench_files["image_folder"])
    records = json.loads(Path(bench_files["json"]).read_text())
    sizes = [Image.open(folder / r["image"]).size for r in records]  # (width, height)
    pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # LLaVA-NeXT's, (height, width)
    anyres_tiles = [1 + math.prod(T.anyres_grid(s, pins, 336)) for s in sizes]
    internvl_tiles = [T.internvl_num_tiles(s, 448, 1, 12, True) for s in sizes]
    assert max(internvl_tiles) > 1 and min(anyres_tiles) >= 3
    text = sum(bench_files["lengths"]) / len(records)
    a = data_bench.parse_args(["--batch", "3", "--workers", "0"])
    for mode, tiles, tokens in (
            ("none", [1] * len(sizes), [576] * len(sizes)),
            ("anyres", anyres_tiles, [T.anyres_num_tokens(s, pins, 336, 24) for s in sizes]),
            ("internvl", internvl_tiles, None),
            ("naflex", [1] * len(sizes), [math.prod(T.naflex_grid(s, 16, 256)) for s in sizes])):
        r = data_bench.run_mode(mode, bench_files, a, 0)
        tokens = tokens or [r["tokens_per_tile"] * n for n in tiles]
        assert (r["samples"], r["batches"], r["skipped"]) == (8, 3, 0), mode
        assert r["tiles_per_image"] == round(sum(tiles) / len(tiles), 3), mode
        assert r["image_tokens_per_sample"] == round(sum(tokens) / len(tokens), 1), mode
        assert r["text_tokens_per_sample"] == round(text, 1) == r["workload_text_tokens_per_sample"], mode
    r = data_bench.run_mode("none", bench_files, data_bench.parse_args(["--batch", "4", "--pack"]), 1)
    assert (r["workers"], r["pack"], r["samples"], r["batches"]) == (1, True, 8, 2)
    assert r["images_s_per_worker"] == r["images_s"] > 0 and r["text_tokens_per_sample"] == round(text, 1)


def test_data_bench_rejects_bad_flags(data_bench):
    for argv in (["--workers", "-1"], ["--workers", "two"], ["--samples", "0"], ["--mode", "tiles"]):
        with pytest.raises(SystemExit):
            data_bench.parse_args(argv)
    assert data_bench.parse_args(["--workers", "0,1,2"]).workers == [0, 1, 2]
    from vlmkit.config import DataConfig

    assert data_bench.parse_args([]).workers == [DataConfig().num_workers]  # as training uses


def test_results_csv_matches_benchmarks_md_and_plots(tmp_path):
    """benchmarks/results.csv (what docs/benchmarks.png shows) holds figures BENCHMARKS.md states, and plots."""
    mod = load_script(ROOT / "benchmarks" / "plot_results.py")
    rows = mod.read(ROOT / "benchmarks" / "results.csv")
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert {r["section"] for r in rows} <= {"speed", "scaling"} and any(r["section"] == "speed" for r in rows)
    for r in rows:
        for k in ("peer_samples_s", "vlmkit_samples_s"):
            if r[k] is not None:
                assert f"{r[k]:.2f}" in text, (r["config"], k, r[k])
    out = mod.plot(rows, tmp_path / "b.png")
    assert Path(out).stat().st_size > 10_000


def test_flops_count_whole_weights_under_zero3_partitioning():
    """DeepSpeed ZeRO-3 leaves each process an empty shard (`ds_numel` keeps the whole size): the FLOP count must
    not fall to zero (it did: MFU 0.017 under recipes/accelerate/zero3.yaml on one H200)."""
    import torch

    from vlmkit.training.flops import _linear_params

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert _linear_params(m) == 48
    m[0].weight.ds_numel = 32
    m[0].weight.data = torch.empty(0)  # what a partitioned parameter holds outside its gather
    assert _linear_params(m) == 48


def test_flop_multipliers_see_whole_shapes_under_zero3(tok_dir):
    """A fully trained LLM counts 3x its forward (forward + two backward matmuls) also when ZeRO-3 left each weight
    an empty 1-D shard with `ds_shape` (it counted 2x: LoRA's multiplier, MFU 0.089 instead of ~0.13)."""
    import torch

    from vlmkit import VLM
    from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig
    from vlmkit.training.flops import FlopCounter

    from conftest import ENCODER_CASES, LLM_KW

    model = VLM.from_config(ModelConfig(encoder=EncoderConfig(name="clip", config=dict(ENCODER_CASES["clip"][1])),
                                        connector=ConnectorConfig("mlp2x_gelu"),
                                        llm=LLMConfig(config=dict(LLM_KW), tokenizer=tok_dir)))
    model.requires_grad_(False)
    for p in [*model.llm.parameters(), *model.connector.parameters()]:
        p.requires_grad_(True)
    whole = FlopCounter.for_model(model).with_stage(model)
    for p in model.llm.parameters():
        p.ds_shape, p.ds_numel, p.data = p.shape, p.numel(), torch.empty(0)
    sharded = FlopCounter.for_model(model).with_stage(model)
    assert whole.mult_llm == sharded.mult_llm == 3 and sharded.llm_linear == whole.llm_linear > 0
