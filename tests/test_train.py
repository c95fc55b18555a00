"""The training loop: a real two-stage run lowers the loss and chains the stages; gradient
accumulation gives the update of one large batch."""
import copy
import json
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import model_config
from vlmkit import VLM
from vlmkit.training import loop
from vlmkit.training.engine import make_accelerator
from vlmkit.training.run import run
from vlmkit.config import DataConfig, RunConfig, StageConfig, TrainConfig
from vlmkit.data import ConversationDataset, collate
from vlmkit.stages import apply_stage

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]


def write_data(out, n=24, seed=0):
    """Captions (stage 1) and one-question conversations (stage 2) about a coloured canvas."""
    rng = random.Random(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    caps, qa = [], []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        Image.new("RGB", (16, 16), COLORS[color]).save(out / "img" / f"{i}.png")
        caps.append({"id": f"c{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a {color} {shape}"}]})
        qa.append({"id": f"q{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": color}]})
    (out / "captions.json").write_text(json.dumps(caps))
    (out / "qa.json").write_text(json.dumps(qa))
    return str(out / "captions.json"), str(out / "qa.json")


def stage(name, train, path, template=None, **kw):
    kw = {"lr": 1e-2, "max_steps": 12, "global_batch_size": 8, "per_device_batch_size": 8, "warmup_ratio": 0.0,
          **kw}
    return StageConfig(name=name, train=train,
                       data=DataConfig(path=path, template=template, max_length=128, num_workers=0), **kw)


STEPS = (12, 20)


def test_two_stage_run_lowers_loss_and_chains_stages(encoder_dirs, llm_dir, tmp_path, monkeypatch):
    caps, qa = write_data(tmp_path / "data")
    out = tmp_path / "run"
    cfg = RunConfig(model=model_config(encoder_dirs["clip"], llm_dir),
                    stages=[stage("pretrain", {"connector": "full"}, caps, "plain", lr=5e-2, max_steps=STEPS[0]),
                            stage("finetune", {"connector": "full", "llm": "full"}, qa, lr=1e-2, max_steps=STEPS[1])],
                    train=TrainConfig(output_dir=str(out), log_with=None, log_every=1, seed=0))
    entry = {}
    real = loop.train_stage

    def spy(accelerator, model, st, *a, **k):
        raw = accelerator.unwrap_model(model)
        entry[st.name] = {n: p.detach().clone() for n, p in raw.state_dict().items()}
        return real(accelerator, model, st, *a, **k)

    monkeypatch.setattr(loop, "train_stage", spy)  # where run() looks it up
    model, _, metrics = run(cfg, cpu=True)

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for name, steps in zip(("pretrain", "finetune"), STEPS):
        losses = [r["loss"] for r in log if r["stage"] == name]
        assert len(losses) == steps and all(l == l for l in losses)
        assert metrics[[m["stage"] for m in metrics].index(name)]["final_loss"] == losses[-1]
    pre = [r["loss"] for r in log if r["stage"] == "pretrain"]
    fin = [r["loss"] for r in log if r["stage"] == "finetune"]
    # stage 1 moves only the connector under a frozen random LLM: a modest but clear drop
    assert max(pre[-3:]) < 0.95 * pre[0], pre
    # stage 2 trains the LLM too: one-word answers are learnt fast
    assert max(fin[-3:]) < 0.4 * fin[0], fin
    assert [m["skipped"] for m in metrics] == [[], []]

    # stage outputs are complete model folders
    for d in ("pretrain", "finetune", "model"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / d).iterdir()}
    assert json.loads((out / "finetune" / "metrics.json").read_text())["steps"] == STEPS[1]
    s1 = load_file(str(out / "pretrain" / "model.safetensors"))
    init, start2 = entry["pretrain"], entry["finetune"]
    conn = [k for k in init if k.startswith("connector.")]
    # stage 1 changed only the connector
    assert all(not torch.equal(init[k], s1[k]) for k in conn)
    assert all(torch.equal(init[k], s1[k]) for k in s1 if not k.startswith("connector."))
    # stage 2 started from stage 1's weights (connector included), not from a fresh init
    assert all(torch.equal(start2[k], s1[k]) for k in s1)
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], init[k]) for k in final if k.startswith("encoder."))  # frozen throughout
    assert any(not torch.equal(final[k], s1[k]) for k in final if k.startswith("llm."))
    reloaded = VLM.from_pretrained(out / "model")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


# ---- gradient accumulation ------------------------------------------------------------------------
ANSWERS = ["red", "two shapes", "a blue triangle in the top left", "yes"]  # different trained-token counts


@pytest.fixture(scope="module")
def accum_setup(encoder_dirs, llm_dir, processor, tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    (out / "img").mkdir()
    recs = []
    for i, a in enumerate(ANSWERS):
        Image.new("RGB", (16, 16), list(COLORS.values())[i]).save(out / "img" / f"{i}.png")
        recs.append({"id": i, "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image." + " picture" * i}, {"from": "gpt", "value": a}]})
    (out / "d.json").write_text(json.dumps(recs))
    torch.manual_seed(0)
    model = VLM.from_config(model_config(encoder_dirs["clip"], llm_dir))
    return model, str(out / "d.json")


def sgd_step(monkeypatch, model, path, per_device, lr=0.5):
    """One optimizer step of the real loop, with plain SGD so the update is exactly -lr * grad."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = stage("s", {"connector": "full", "llm": "full"}, path, lr=lr, max_steps=1, global_batch_size=4,
               per_device_batch_size=per_device, max_grad_norm=0.0)
    acc = make_accelerator(TrainConfig(log_with=None), cpu=True)
    ds = ConversationDataset(path, model.processor(), max_length=128)
    log_dir = path.rsplit("/", 1)[0]
    from pathlib import Path

    loop.train_stage(acc, model, st, ds, Path(log_dir))
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters() if n in before}


def test_gradient_accumulation_equals_full_batch(accum_setup, monkeypatch):
    model, path = accum_setup
    full = sgd_step(monkeypatch, model, path, per_device=4)
    accum = sgd_step(monkeypatch, model, path, per_device=2)
    moved = [n for n, d in full.items() if d.abs().max() > 0]
    assert any(n.startswith("connector.") for n in moved) and any(n.startswith("llm.") for n in moved)
    assert not any(n.startswith("encoder.") for n in moved)
    for n in full:
        torch.testing.assert_close(accum[n], full[n], atol=2e-6, rtol=1e-4, msg=n)

    # reference: -lr * grad of the token-mean loss over the whole batch, computed directly
    ref = copy.deepcopy(model)
    apply_stage(ref, {"connector": "full", "llm": "full"})
    ds = ConversationDataset(path, ref.processor(), max_length=128)
    b = collate([ds[i] for i in range(4)], ref.tokenizer.pad_token_id)
    ref(**b).backward()
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(full[n], -0.5 * p.grad, atol=2e-6, rtol=1e-4, msg=n)


def test_num_items_makes_micro_batches_sum_to_the_batch_mean(accum_setup):
    """VLM.forward(num_items=total labelled tokens) summed over micro-batches == the batch mean; the
    naive mean of per-micro-batch means differs when the batches hold different token counts."""
    model, path = accum_setup
    model = copy.deepcopy(model)
    apply_stage(model, {"connector": "full", "llm": "full"})
    ds = ConversationDataset(path, model.processor(), max_length=128)
    items = [ds[i] for i in range(4)]
    pad = model.tokenizer.pad_token_id
    full = collate(items, pad)
    mbs = [collate(items[:2], pad), collate(items[2:], pad)]
    n_items = int((full["labels"][:, 1:] != -100).sum())
    counts = [int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs]
    assert counts[0] != counts[1] and sum(counts) == n_items

    def grads(losses):
        model.zero_grad(set_to_none=True)
        sum(losses).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g_full = grads([model(**full)])
    g_acc = grads([model(**mb, num_items=n_items) for mb in mbs])
    g_naive = grads([model(**mb) / 2 for mb in mbs])
    for n in g_full:
        torch.testing.assert_close(g_acc[n], g_full[n], atol=1e-6, rtol=1e-4, msg=n)
    assert any(not torch.allclose(g_naive[n], g_full[n], atol=1e-5) for n in g_full)
    with torch.no_grad():
        loss_sum = sum(float(model(**mb, num_items=n_items)) for mb in mbs)
        assert loss_sum == pytest.approx(float(model(**full)), rel=1e-5)


def test_cpu_threads_undo_the_launchers_single_thread_default(monkeypatch):
    """`accelerate launch` without a config pins OMP_NUM_THREADS=1 on a GPU-less machine; a user's choice stays."""
    import os
    from types import SimpleNamespace

    import torch

    from vlmkit.train import cpu_threads

    before = torch.get_num_threads()
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        monkeypatch.delenv("VLMKIT_CPU_THREADS", raising=False)
        torch.set_num_threads(1)
        cpu_threads(acc)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        monkeypatch.setenv("VLMKIT_CPU_THREADS", "1")
        cpu_threads(acc)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("VLMKIT_CPU_THREADS")
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")  # not launched by accelerate: OMP_NUM_THREADS=1 is the user's
        cpu_threads(acc)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
