"""Several processes: a batch without images still runs the image path in training (the ZeRO-3 / DDP hang of a
module some ranks skip), without changing the loss; the compile option; the shipped accelerate configs.

The 2-process test launches this file as a script under `accelerate launch` (gloo on CPU): rank 0 trains on
conversations with images, rank 1 on text-only ones, connector + LLM trainable.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import ACCELERATE_LAUNCH, launch_env, model_config
from vlmkit import VLM
from vlmkit.config import DataConfig, StageConfig, TilingConfig, TrainConfig
from vlmkit.data import ConversationDataset, collate
from vlmkit.stages import apply_stage

ROOT = Path(__file__).resolve().parent.parent
# on a GPU machine: VLMKIT_TEST_DEVICE=cuda (NCCL) and e.g. VLMKIT_TEST_LAUNCH="--config_file
# recipes/accelerate/zero3.yaml" run the same 2-process test through DeepSpeed
DEVICE = os.environ.get("VLMKIT_TEST_DEVICE", "cpu")
LAUNCH = os.environ.get("VLMKIT_TEST_LAUNCH", "--multi_gpu --mixed_precision no --dynamo_backend no").split()
COLORS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30)]


def write_data(out: Path, n: int = 16) -> tuple[str, str]:
    """Two LLaVA-format files of the same length: one question per image, and text-only conversations."""
    (out / "img").mkdir(parents=True, exist_ok=True)
    img, txt = [], []
    for i in range(n):
        Image.new("RGB", (16, 16), COLORS[i % 4]).save(out / "img" / f"{i}.png")
        img.append({"id": f"i{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": ["red", "green", "blue", "yellow"][i % 4]}]})
        txt.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": ["one", "two"][i % 2]}]})
    (out / "img.json").write_text(json.dumps(img))
    (out / "txt.json").write_text(json.dumps(txt))
    return str(out / "img.json"), str(out / "txt.json")


# ---- the rule on one process: exact zero, only in training, only when it matters ---------------------------
def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture()
def text_batch(vlm, tmp_path):
    _, txt = write_data(tmp_path, n=4)
    ds = ConversationDataset(txt, vlm.processor(), max_length=64)
    return collate([ds[i] for i in range(4)], vlm.tokenizer.pad_token_id)


def test_text_only_batch_runs_the_trainable_image_path_with_zero_effect(vlm, text_batch):
    model = copy.deepcopy(vlm)
    apply_stage(model, {"connector": "full", "llm": "full"})
    enc, conn = count_calls(model.encoder), count_calls(model.connector)
    model.eval()
    with torch.no_grad():
        ref = model(**text_batch)  # inference: the image path is not run
    assert (len(enc), len(conn)) == (0, 0)
    model.train()
    loss = model(**text_batch)
    assert (len(enc), len(conn)) == (1, 1)  # one blank tile through encoder + connector
    assert torch.equal(loss.detach(), ref)  # exactly the same loss
    loss.backward()
    for n, p in model.connector.named_parameters():  # used (DDP sees a gradient) and exactly zero
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.llm.parameters())


def test_text_only_batch_skips_a_frozen_unsharded_image_path(vlm, text_batch):
    model = copy.deepcopy(vlm)
    apply_stage(model, {"llm": "full"})
    enc = count_calls(model.encoder)
    model.train()
    model(**text_batch).backward()
    assert len(enc) == 0  # nothing to synchronise: frozen and whole on every process
    # a ZeRO-3-partitioned (ds_id) frozen encoder gathers its shards collectively: then it runs
    next(model.encoder.parameters()).ds_id = 0
    model(**text_batch)
    assert len(enc) == 1


def test_text_only_batch_reaches_image_newline(encoder_dirs, llm_dir, tmp_path):
    cfg = model_config(encoder_dirs["clip"], llm_dir)
    cfg.tiling = TilingConfig("anyres", "(1x1),...,(2x2)")
    torch.manual_seed(0)
    model = VLM.from_config(cfg)
    apply_stage(model, {"connector": "full", "image_newline": "full"})
    _, txt = write_data(tmp_path, n=2)
    ds = ConversationDataset(txt, model.processor(), max_length=64)
    b = collate([ds[0], ds[1]], model.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        ref = model(**b)
    model.train()
    loss = model(**b)
    assert torch.equal(loss.detach(), ref)
    loss.backward()
    assert model.image_newline.grad is not None and torch.count_nonzero(model.image_newline.grad) == 0


def test_connector_computes_in_its_own_dtype(vlm):
    """DeepSpeed ZeRO-3 under bf16 was seen (H200, 2 GPUs) leaving the trained connector in fp32 beside a
    bf16 encoder: the features are cast to the connector's dtype instead of failing in its first Linear."""
    model = copy.deepcopy(vlm)
    model.encoder.to(torch.bfloat16)
    pix = torch.rand(2, 3, 16, 16)
    out = model.encode_images(pix)
    assert out.dtype == torch.float32
    ref = vlm.connector(model.encoder(pix).float(), model.encoder.grid)
    assert torch.equal(out, ref)


# ---- the rule on two processes (DDP over gloo) ---------------------------------------------------------------
def launch_two(script_args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """This file as a script on 2 gloo processes (accelerate launch, standalone rendezvous: no port is picked
    and handed on). A hang is killed after `timeout` s."""
    cmd = [*ACCELERATE_LAUNCH, *LAUNCH, "--num_processes", "2", "--num_machines", "1", __file__, *script_args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"2-process training did not finish within {timeout} s (a hang): "
                             f"{(e.stderr or b'')[-2000:]!r}") from None


def test_image_and_text_only_ranks_do_not_hang_and_stay_in_sync(vlm, tmp_path):
    img, txt = write_data(tmp_path / "data")
    vlm.save_pretrained(tmp_path / "model")
    env = launch_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                     PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # this checkout
    p = launch_two([str(tmp_path / "model"), img, txt, str(tmp_path / "out"), DEVICE], env)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["world"] == 2 and res["batches_with_images"] == [3 * 2, 0]  # 3 steps x 2 micro-batches each
    assert res["rendezvous"] not in (None, "none")  # standalone (static would say "none")
    init = VLM.from_pretrained(tmp_path / "model").state_dict()
    r0, r1 = res["connector"]
    if not res["sharded"]:  # ZeRO-3 / FSDP: one gathered copy, nothing to compare between processes
        assert r0 == r1  # the same weights on both processes, bit for bit
    assert any(abs(r0[k] - init[k].float().sum().item()) > 1e-6 for k in r0)  # and they moved


def test_video_and_no_video_ranks_do_not_hang_and_stay_in_sync(tok_dir, tmp_path):
    """Rank 0's batches hold videos, rank 1's none: rank 1 runs the video path on a zero-weighted blank frame, so
    DDP's gradient all-reduce meets the same parameters on both (no hang), and the weights stay equal."""
    from test_video_model import video_config
    from vlmkit.experiments import video_demo as D

    data = tmp_path / "data"
    _, txt = write_data(data)
    vids = []
    for i in range(16):
        D.write_mp4(data / f"v{i}.mp4", [D.draw(16, [("red", "square", 2 + 4 * t, 6, 4)]) for t in range(2)])
        vids.append({"id": f"v{i}", "video": f"v{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": ["right", "left"][i % 2]}]})
    (data / "vid.json").write_text(json.dumps(vids))
    torch.manual_seed(0)
    VLM.from_config(video_config(tok_dir, pool="average")).save_pretrained(tmp_path / "model")
    env = launch_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                     PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = launch_two([str(tmp_path / "model"), str(data / "vid.json"), txt, str(tmp_path / "out"), DEVICE,
                    "pixel_values_videos"], env)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["world"] == 2 and res["batches_with_images"] == [3 * 2, 0]  # every rank-0 batch had video
    init = VLM.from_pretrained(tmp_path / "model").state_dict()
    r0, r1 = res["connector"]
    if not res["sharded"]:
        assert r0 == r1  # the same weights on both processes, bit for bit
    assert any(abs(r0[k] - init[k].float().sum().item()) > 1e-6 for k in r0)


def _worker(model_dir: str, img: str, txt: str, out: str, device: str = "cpu", key: str = "pixel_values") -> None:
    """One process of the 2-process run: rank 0 trains on `img`, rank 1 on `txt` (same length), 3 steps; `key`:
    the pixels whose presence is counted (`pixel_values`, or `pixel_values_videos` for video samples in `img`)."""
    from accelerate.utils import gather_object

    from vlmkit.train import full_state_dict, make_accelerator, shards_weights, train_stage

    acc = make_accelerator(TrainConfig(log_with=None, output_dir=out), cpu=device == "cpu")
    torch.manual_seed(0)
    model = VLM.from_pretrained(model_dir)
    path = img if acc.process_index == 0 else txt
    ds = ConversationDataset(path, model.processor(), max_length=64)
    seen = []
    real_forward = model.forward

    def spy(**kw):
        seen.append(kw.get(key) is not None and kw[key].shape[0] > 0)
        return real_forward(**kw)

    model.forward = spy
    st = StageConfig(name="mixed", train={"connector": "full", "llm": "full"},
                     data=DataConfig(path=path, max_length=64, num_workers=0), lr=1e-2, max_steps=3,
                     global_batch_size=8, per_device_batch_size=2, warmup_ratio=0.0)
    Path(out).mkdir(parents=True, exist_ok=True)
    got = {}

    def finish(prepared, _):  # sharded weights are gathered while the engine is alive
        state = full_state_dict(acc, prepared)
        if state is None:
            state = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
        got.update({k: v.float().sum().item() for k, v in (state or {}).items() if k.startswith("connector.")})

    train_stage(acc, model, st, ds, Path(out), on_finish=finish)
    rows = gather_object([{"connector": got, "images": sum(seen)}])
    if acc.is_main_process:
        conn = [r["connector"] for r in rows]
        if shards_weights(acc):
            conn = [conn[0], conn[0]]
        Path(out, "result.json").write_text(json.dumps({"world": acc.num_processes, "connector": conn,
                                                        "sharded": shards_weights(acc),
                                                        "rendezvous": os.environ.get("TORCHELASTIC_RUN_ID"),
                                                        "batches_with_images": [r["images"] for r in rows]}))


# ---- the process group's end ------------------------------------------------------------------------------
# Run as its own interpreter: a 1-process gloo group (a file rendezvous, no port), a gathered object, then
# vlmkit.train.run (with a tracker and without). The first atexit handler registered runs last: it reports
# whether the group was still up after vlmkit's own exit handler.
EXIT_PROG = """
import atexit, json, sys
import torch.distributed as dist
atexit.register(lambda: print("AT_EXIT", json.dumps(dist.is_initialized()), flush=True))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
got = [None]
dist.all_gather_object(got, {"rank": 0})
from vlmkit.config import load_config
from vlmkit.train import run
run(load_config(sys.argv[2]), cpu=True)
print("AFTER_RUN", json.dumps(dist.is_initialized()), flush=True)
"""


@pytest.mark.parametrize("log_with", [None, "tensorboard"])
def test_process_group_outlives_run_and_ends_before_interpreter_exit(encoder_dirs, llm_dir, tmp_path, log_with):
    """A gloo group left to interpreter finalization can abort a finished rank (vlmkit/distributed.py): the
    accelerator vlmkit makes destroys the group at exit, and run() leaves it up for the caller."""
    img, _ = write_data(tmp_path / "data", n=4)
    cfg = {"model": {"encoder": {"name": "clip", "path": encoder_dirs["clip"]}, "connector": {"name": "mlp2x_gelu"},
                     "llm": {"path": llm_dir}},
           "stages": [{"name": "s", "train": {"connector": "full"}, "lr": 1e-2, "max_steps": 1,
                       "global_batch_size": 2, "per_device_batch_size": 2,
                       "data": {"path": img, "max_length": 64, "num_workers": 0}}],
           "train": {"output_dir": str(tmp_path / "out"), "log_with": log_with}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", EXIT_PROG, str(tmp_path / "store"), str(tmp_path / "run.yaml")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "AFTER_RUN true" in p.stdout, p.stdout  # the returned accelerator can still synchronise
    assert "AT_EXIT false" in p.stdout, p.stdout  # destroyed (gloo's threads joined) before finalization
    assert bool(list((tmp_path / "out").rglob("events.out.tfevents.*"))) == bool(log_with)


# ---- compile option ---------------------------------------------------------------------------------------
def _inductor_cpu_available() -> str | None:
    """None when torch.compile's CPU backend works here, else why not."""
    try:
        f = torch.compile(lambda x: torch.sin(x) + 1, backend="inductor")
        f(torch.ones(3))
    except Exception as e:  # no C++ compiler, unsupported platform
        return f"torch.compile's inductor CPU backend is unavailable here: {type(e).__name__}: {str(e)[:200]}"
    return None


def test_compiled_training_step_matches_eager(vlm, tmp_path, monkeypatch):
    why = _inductor_cpu_available()
    if why:
        pytest.skip(why)
    from vlmkit import train as train_mod

    img, _ = write_data(tmp_path / "data", n=8)
    losses = {}
    for compiled in (False, True):
        model = copy.deepcopy(vlm)
        st = StageConfig(name="s", train={"connector": "full", "llm": "full"},
                         data=DataConfig(path=img, max_length=64, num_workers=0), lr=1e-2, max_steps=2,
                         global_batch_size=4, per_device_batch_size=4, warmup_ratio=0.0, compile=compiled)
        acc = train_mod.make_accelerator(TrainConfig(log_with=None), cpu=True)
        ds = ConversationDataset(img, model.processor(), max_length=64)
        log = tmp_path / f"log{int(compiled)}"
        log.mkdir()
        torch.manual_seed(0)
        train_mod.train_stage(acc, model, st, ds, log, log_every=1)
        losses[compiled] = [json.loads(line)["loss"] for line in (log / "log.jsonl").read_text().splitlines()]
        layers = model.decoder_layers()
        assert all((getattr(m, "_compiled_call_impl", None) is not None) == compiled for m in layers)
    assert len(losses[True]) == 2
    # step 1 from the same weights, step 2 after the same update: equal up to kernel rounding
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


# ---- the shipped accelerate configs -------------------------------------------------------------------------
def test_accelerate_configs_are_consistent():
    d = ROOT / "recipes" / "accelerate"
    kinds = {"single_gpu": "NO", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
    for name, kind in kinds.items():
        cfg = yaml.safe_load((d / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] == kind, name
        assert isinstance(cfg["num_processes"], int), name
        if kind != "DEEPSPEED":
            assert cfg["mixed_precision"] == "bf16", name
        else:  # bf16 comes from the JSON: accelerate refuses mixed_precision beside a DeepSpeed config file
            assert "mixed_precision" not in cfg, name
            ds_file = ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
            ds = json.loads(ds_file.read_text())
            assert ds["zero_optimization"]["stage"] == int(name[-1])
            assert ds["bf16"]["enabled"] is True and "fp16" not in ds
            # filled per stage by vlmkit.train.configure_engine
            for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size",
                        "gradient_clipping"):
                assert ds[key] == "auto", (name, key)
    z3 = json.loads((d / "ds_zero3.json").read_text())
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    fsdp = yaml.safe_load((d / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp_wraps_the_models_own_blocks(vlm):
    """fsdp2.yaml's transformer-based wrap reads `_no_split_modules`: the LLM's and the encoder's blocks."""
    names = vlm._no_split_modules
    assert "LlamaDecoderLayer" in names and "CLIPEncoderLayer" in names
    classes = {type(m).__name__ for m in vlm.modules()}
    assert set(names) <= classes


def test_configure_engine_sets_deepspeed_batch_shape_per_stage():
    """Each stage re-prepares with its own micro-batch / accumulation / clipping: written over the values the
    previous stage's prepare filled in (accelerate fills "auto" entries once)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from vlmkit.train import configure_engine

    ds_cfg = {"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 8, "train_batch_size": 64,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, gradient_accumulation_steps=4,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_cfg)))
    configure_engine(acc, micro=16, accum=2, max_grad_norm=0.0)
    assert acc.gradient_accumulation_steps == 2
    assert (ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"],
            ds_cfg["train_batch_size"], ds_cfg["gradient_clipping"]) == (16, 2, 64, 0.0)


if __name__ == "__main__":
    _worker(*sys.argv[1:7])


def test_plain_init_builds_whole_models_while_zero3_is_registered(vlm, tmp_path):
    """After a sharded run, run() reloads the consolidated model on every process. accelerate has then
    registered ZeRO-3 with transformers, which would partition (and, on the meta device, fail on) every
    model built; plain_init clears that registration for the build and restores it after."""
    import weakref

    import transformers.integrations.deepspeed as hf_ds

    from vlmkit.train import plain_init

    class Zero3:  # what HfDeepSpeedConfig answers
        def is_zero3(self):
            return True

    vlm.save_pretrained(tmp_path / "m")
    registered = Zero3()
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = weakref.ref(registered)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with plain_init():
            assert not hf_ds.is_deepspeed_zero3_enabled()
            back = VLM.from_pretrained(tmp_path / "m")
        assert hf_ds.is_deepspeed_zero3_enabled()  # restored for the engine that is still configured
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
    for (k, a), b in zip(vlm.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
