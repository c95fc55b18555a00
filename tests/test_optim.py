"""Per-stage optimizer and schedule (vlmkit/training/optim.py): the defaults build exactly what vlmkit built before
they were configurable; every schedule name gives transformers' own curve; bad names and kwargs are config errors
before the model is built; a resumed stage continues its schedule."""
from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers.optimization as tfo

from conftest import model_config
from test_train import write_data
from vlmkit.config import ConfigError, DataConfig, RunConfig, StageConfig, TrainConfig, scheduler_names
from vlmkit.extras import MissingExtra
from vlmkit.training import optim, preempt
from vlmkit.training import precision as prec
from vlmkit.training.stages import apply_stage, param_groups


def stage(**kw) -> StageConfig:
    return StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x.json"), **kw)


CPU = SimpleNamespace(device=torch.device("cpu"))


def lrs(sched, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr())
        sched.optimizer.step()
        sched.step()
    return out


def test_default_stage_builds_the_same_optimizer_and_schedule_as_before(vlm):
    raw = copy.deepcopy(vlm)
    st = stage(lr=1e-3, weight_decay=0.1, warmup_ratio=0.1)
    assert (st.optimizer, st.betas, st.eps, st.lr_scheduler, st.lr_scheduler_kwargs) == (
        "adamw", [0.9, 0.999], 1e-8, "cosine", {})
    apply_stage(raw, st.train, st.lr)
    opt = optim.make_optimizer(CPU, raw, st, "fp32")
    before = torch.optim.AdamW(param_groups(raw, st), lr=st.lr, betas=(0.9, 0.999), fused=False)  # as loop.py did
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults == before.defaults
    strip = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in before.param_groups]
    total = 30
    ours = lrs(optim.make_scheduler(opt, st, total), 12)
    theirs = lrs(tfo.get_cosine_schedule_with_warmup(before, st.warmup_steps(total), total), 12)
    assert ours == theirs and ours[0][0] == 0.0 and ours[3][0] == pytest.approx(1e-3)  # 3 warmup steps
    master = optim.make_optimizer(CPU, copy.deepcopy(raw).to(torch.bfloat16), st, "bf16-master")
    assert type(master) is prec.MasterAdamW and master.defaults == before.defaults


CURVES = {  # name: (lr_scheduler_kwargs, transformers' own function called directly)
    "linear": ({}, lambda o, w, t: tfo.get_linear_schedule_with_warmup(o, w, t)),
    "cosine": ({}, lambda o, w, t: tfo.get_cosine_schedule_with_warmup(o, w, t)),
    "cosine_with_restarts": ({"num_cycles": 2},
                             lambda o, w, t: tfo.get_cosine_with_hard_restarts_schedule_with_warmup(o, w, t, 2)),
    "polynomial": ({"power": 2.0, "lr_end": 1e-5},
                   lambda o, w, t: tfo.get_polynomial_decay_schedule_with_warmup(o, w, t, lr_end=1e-5, power=2.0)),
    "constant": ({}, lambda o, w, t: tfo.get_constant_schedule(o)),
    "constant_with_warmup": ({}, lambda o, w, t: tfo.get_constant_schedule_with_warmup(o, w)),
    "inverse_sqrt": ({"timescale": 3}, lambda o, w, t: tfo.get_inverse_sqrt_schedule(o, w, timescale=3)),
    "cosine_with_min_lr": ({"min_lr_rate": 0.1},
                           lambda o, w, t: tfo.get_cosine_with_min_lr_schedule_with_warmup(o, w, t, min_lr_rate=0.1)),
    "cosine_warmup_with_min_lr": ({"min_lr_rate": 0.1, "warmup_lr_rate": 0.2},
                                  lambda o, w, t: tfo.get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
                                      o, w, t, min_lr_rate=0.1, warmup_lr_rate=0.2)),
    "warmup_stable_decay": ({"num_decay_steps": 6},
                            lambda o, w, t: tfo.get_wsd_schedule(o, w, 6, num_training_steps=t)),
}


def sgd(lr: float):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("name", sorted(CURVES))
def test_each_schedule_is_transformers_own_curve(name):
    kwargs, theirs = CURVES[name]
    st = stage(lr=2e-3, warmup_ratio=0.2, lr_scheduler=name, lr_scheduler_kwargs=kwargs)
    total = 20
    got = lrs(optim.make_scheduler(sgd(st.lr), st, total), total)
    want = lrs(theirs(sgd(st.lr), st.warmup_steps(total), total), total)
    assert got == want
    assert len({round(x[0], 12) for x in got}) > (1 if name == "constant" else 3) or name == "constant"


def test_every_schedule_transformers_knows_is_tested_or_refused():
    from transformers.trainer_utils import SchedulerType

    assert set(scheduler_names()) == set(CURVES)
    assert {s.value for s in SchedulerType} == set(CURVES) | set(StageConfig.SCHEDULERS_REFUSED)


def test_unknown_names_are_config_errors_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"stage 's': unknown optimizer 'sgd'; known: adamw, adamw_8bit"):
        stage(optimizer="sgd")
    with pytest.raises(ConfigError, match=r"unknown lr_scheduler 'cosin'; known: linear, cosine, "
                                          r"cosine_with_restarts, polynomial, constant, .*warmup_stable_decay"):
        stage(lr_scheduler="cosin")
    with pytest.raises(ConfigError, match=r"lr_scheduler reduce_lr_on_plateau cannot be used: it steps on a "
                                          r"validation metric"):
        stage(lr_scheduler="reduce_lr_on_plateau")
    with pytest.raises(ConfigError, match=r"betas must be two numbers in \[0, 1\), got \[0.9, 1.5\]"):
        stage(betas=[0.9, 1.5])
    with pytest.raises(ConfigError, match=r"eps must be a number > 0"):
        stage(eps=0)
    # kwargs the schedule does not take, or lacks: found by building it, before any model exists
    with pytest.raises(ConfigError, match=r"stage s: lr_scheduler warmup_stable_decay with lr_scheduler_kwargs "
                                          r"\{\}: .*num_decay_steps"):
        optim.check_stages([stage(lr_scheduler="warmup_stable_decay")], "cpu", "fp32")
    with pytest.raises(ConfigError, match=r"lr_scheduler linear with lr_scheduler_kwargs \{'power': 2\}: .*power"):
        optim.check_stages([stage(lr_scheduler="linear", lr_scheduler_kwargs={"power": 2})], "cpu", "fp32")


def test_adamw_8bit_needs_cuda_and_bitsandbytes_and_no_engine(monkeypatch):
    st = stage(optimizer="adamw_8bit")
    with pytest.raises(ConfigError, match=r"stage s: optimizer adamw_8bit needs a CUDA device .* this run is on cpu"):
        optim.check_stages([st], "cpu", "fp32")
    with pytest.raises(ConfigError, match=r"under DeepSpeed / FSDP: the engine shards and steps its own"):
        optim.check_stages([st], "cuda", "engine")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(MissingExtra, match=r"stage s: optimizer adamw_8bit needs the bitsandbytes package.*"
                                           r"pip install 'vlmkit\[qlora\]'"):
        optim.check_stages([st], "cuda", "fp32")


def test_masters_work_under_any_torch_optimizer_class():
    """with_masters(cls) (how adamw_8bit keeps fp32 masters under bf16-master) steps the fp32 masters exactly as
    `cls` steps fp32 weights given the same gradients; AdamW's is MasterAdamW."""
    assert prec.with_masters(torch.optim.AdamW) is prec.MasterAdamW
    torch.manual_seed(0)
    full = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    half = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in full]
    ref = [torch.nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in full]
    cls = prec.with_masters(torch.optim.Adam)
    opt, ref_opt = cls([{"params": half}], lr=1e-3, betas=(0.8, 0.99), eps=1e-6), torch.optim.Adam(
        [{"params": ref}], lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    assert cls.__name__ == "MasterAdam" and isinstance(opt, prec.MasterWeights)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ref]
        for p, r, g in zip(half, ref, grads):
            p.grad, r.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
    masters = opt.state_dict()["master_weights"]
    assert all(torch.equal(m, r.detach()) for m, r in zip(masters, ref))
    assert all(torch.equal(p.detach(), r.detach().to(torch.bfloat16)) for p, r in zip(half, ref))


def test_resume_continues_the_configured_schedule(encoder_dirs, llm_dir, tmp_path, monkeypatch):
    from vlmkit.training.run import run

    caps, _ = write_data(tmp_path / "data", n=8)

    def cfg(out):
        st = StageConfig(name="s1", train={"connector": "full"},
                         data=DataConfig(path=caps, template="plain", max_length=128, num_workers=0),
                         lr=1e-2, max_steps=6, global_batch_size=4, per_device_batch_size=4, warmup_ratio=0.34,
                         lr_scheduler="polynomial", lr_scheduler_kwargs={"power": 3.0, "lr_end": 1e-4},
                         betas=[0.8, 0.95], eps=1e-6)
        return RunConfig(model=model_config(encoder_dirs["clip"], llm_dir), stages=[st],
                         train=TrainConfig(output_dir=str(out), log_with=None, log_every=1, save_steps=2))

    def logged(out):
        return [(r["step"], r["lr"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    run(cfg(tmp_path / "ref"), cpu=True)
    calls = {"n": 0}

    def stop_after_third(accelerator=None):
        calls["n"] += 1
        return 15 if calls["n"] == 3 else None

    monkeypatch.setattr(preempt, "requested", stop_after_third)
    with pytest.raises(preempt.Preempted):
        run(cfg(tmp_path / "cut"), cpu=True)
    monkeypatch.setattr(preempt, "requested", lambda accelerator=None: None)
    assert [s for s, _, _ in logged(tmp_path / "cut")] == [1, 2, 3]
    run(cfg(tmp_path / "cut"), cpu=True)  # continues after checkpoint-3
    ref, cut = logged(tmp_path / "ref"), logged(tmp_path / "cut")
    assert [x[:2] for x in cut] == [x[:2] for x in ref]  # the same lr at every step
    assert [x[2] for x in cut] == pytest.approx([x[2] for x in ref], rel=1e-5)
    want = lrs(tfo.get_polynomial_decay_schedule_with_warmup(sgd(1e-2), 3, 6, lr_end=1e-4, power=3.0), 7)[1:]
    assert [lr for _, lr, _ in ref] == [w[0] for w in want]
