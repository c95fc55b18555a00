"""Packing: a micro-batch's samples in one row (or a few) without padding, attention kept within each sample.

The packed path must give the padded path's loss and gradients (same samples, same num_items) for every
attention implementation that vlmkit lets carry a packed batch, and no sample may see another.
Tolerance: float32 on CPU, the packed and padded paths differ only in summation order and attention kernels
(per-sample vs masked): |loss_packed - loss_padded| <= 1e-5 * |loss_padded|, gradients within 1e-4 relative
(max abs difference / max abs gradient; 1e-5 for sdpa / eager / varlen in practice).
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import model_config
from vlmkit import VLM
from vlmkit.attention import VARLEN, cu_seqlens_from_position_ids
from vlmkit.config import ConfigError, DataConfig, StageConfig, TilingConfig
from vlmkit.data.processor import collate, collate_packed

COLORS = [(220, 40, 40), (40, 170, 60), (40, 80, 220)]
QUESTIONS = ["What color is the shape?", "How many shapes are there?", "Describe the image.",
             "What color is the shape? How many shapes are there? Describe the image."]
ANSWERS = ["red", "a green square in the top left", "one two three four", "a blue triangle"]
IMPLS = ["sdpa", "eager", "varlen", "flex_attention"]


def sample(proc, k: int, n_images: int):
    imgs = [Image.new("RGB", (12 + 4 * j, 16 + 3 * k), COLORS[(j + k) % 3]) for j in range(n_images)]
    conv = [{"from": "human", "value": "<image>\n" * n_images + QUESTIONS[k % 4]},
            {"from": "gpt", "value": ANSWERS[k % 4]},
            {"from": "human", "value": QUESTIONS[(k + 1) % 4]}, {"from": "gpt", "value": ANSWERS[(k + 2) % 4]}]
    return proc(conv[: 2 + 2 * (k % 2)], imgs)


def samples_for(proc):
    """Four samples of different lengths with 1, 2, 0 and 1 images."""
    return [sample(proc, k, n) for k, n in enumerate([1, 2, 0, 1])]


def build(encoder_dirs, llm_dir, impl: str, tiling: TilingConfig | None = None) -> VLM:
    cfg = model_config(encoder_dirs["clip"], llm_dir)
    cfg.llm.attn_implementation = impl
    if tiling is not None:
        cfg.tiling = tiling
    torch.manual_seed(0)
    return VLM.from_config(cfg).train()  # dropout is 0: train mode is deterministic


def flex_unavailable(e: Exception) -> bool:
    """The one stated limitation: this torch build has no flex_attention (an import or capability error naming
    it). Any other failure to build a model is a failure, never a skip."""
    return isinstance(e, (ImportError, NotImplementedError, RuntimeError, ValueError)) and "flex" in str(e).lower()


@pytest.fixture(scope="module")
def models(encoder_dirs, llm_dir):
    out = {}
    for impl in IMPLS:
        try:
            out[impl] = build(encoder_dirs, llm_dir, impl)
        except Exception as e:  # noqa: BLE001 - only flex_attention's absence is skipped
            if impl != "flex_attention" or not flex_unavailable(e):
                raise
            out[impl] = e
    return out


def get(models, impl):
    m = models[impl]
    if isinstance(m, Exception):
        pytest.skip(f"{impl} unavailable here: {m}")
    return m


def loss_and_grads(model, batch, n_items):
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.connector.parameters():
        p.requires_grad_(True)
    try:
        loss = model(**batch, num_items=n_items)
    except Exception as e:  # noqa: BLE001
        if "flex" in model.llm.config._attn_implementation:
            pytest.skip(f"flex_attention does not run on this CPU build: {type(e).__name__}: {e}")
        raise
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.connector.named_parameters()}


# ---- the collate ----------------------------------------------------------------------------------
def test_collate_packed_layout(processor):
    s = samples_for(processor)
    lens = [len(x["input_ids"]) for x in s]
    b = collate_packed(s, processor.tokenizer.pad_token_id)
    assert b["input_ids"].shape == (1, sum(lens))
    assert b["cu_seqlens"].tolist() == [0] + torch.tensor(lens).cumsum(0).tolist()
    assert b["cu_seqlens"].dtype == torch.int32 and b["max_seqlen"] == max(lens)
    assert b["position_ids"][0].tolist() == [i for n in lens for i in range(n)]
    assert int(b["attention_mask"].sum()) == sum(lens)
    off = 0
    for x, n in zip(s, lens):
        assert torch.equal(b["input_ids"][0, off:off + n], x["input_ids"])
        assert b["labels"][0, off] == -100 and torch.equal(b["labels"][0, off + 1:off + n], x["labels"][1:])
        off += n
    padded = collate(s, processor.tokenizer.pad_token_id)
    assert torch.equal(b["pixel_values"], padded["pixel_values"])  # images in sample order
    assert torch.equal(b["images_per_sample"], padded["images_per_sample"])
    # the loop's count of labelled tokens is the same for both layouts
    assert int((b["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    assert torch.equal(cu_seqlens_from_position_ids(b["position_ids"]), b["cu_seqlens"])


def test_collate_packed_rows_with_a_budget(processor):
    s = samples_for(processor)
    lens = [len(x["input_ids"]) for x in s]
    budget = max(lens[0] + lens[1], lens[2] + lens[3], max(lens))
    b = collate(s, processor.tokenizer.pad_token_id, pack=True, max_tokens=budget)
    rows = []
    for n in lens:  # sequential fill, as the collate does
        if rows and sum(rows[-1]) + n <= budget:
            rows[-1].append(n)
        else:
            rows.append([n])
    L = max(sum(r) for r in rows)
    assert b["input_ids"].shape == (len(rows), L)
    assert b["attention_mask"].sum(1).tolist() == [sum(r) for r in rows]
    # a row's padding belongs to its last sample: positions continue, labels -100
    cu = b["cu_seqlens"].tolist()
    assert cu[-1] == len(rows) * L and len(cu) == len(s) + 1
    assert torch.equal(cu_seqlens_from_position_ids(b["position_ids"]), b["cu_seqlens"])
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    # a sample longer than the budget gets a row of its own
    one = collate_packed(s, processor.tokenizer.pad_token_id, max_tokens=1)
    assert one["input_ids"].shape[0] == len(s)


def test_collate_packed_keeps_skips(processor):
    s = samples_for(processor)[:2] + [{"skipped": {"id": "x", "reason": "bad"}}]
    b = collate(s, processor.tokenizer.pad_token_id, pack=True)
    assert b["skipped"] == [{"id": "x", "reason": "bad"}] and len(b["ids"]) == 2
    assert collate([{"skipped": 1}], 0, pack=True) == {"skipped": [1]}


# ---- same loss, same gradients --------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", [0, 60])
def test_packed_loss_and_grads_equal_padded(models, processor, impl, budget):
    model = get(models, impl)
    s = samples_for(processor)
    pad_id = processor.tokenizer.pad_token_id
    padded, packed = collate(s, pad_id), collate(s, pad_id, pack=True, max_tokens=budget)
    if budget:
        assert packed["input_ids"].shape[0] > 1  # several rows, with row-end padding
    n_items = int((padded["labels"][:, 1:] != -100).sum())
    torch.manual_seed(0)
    ref_loss, ref_grads = loss_and_grads(model, padded, n_items)
    loss, grads = loss_and_grads(model, packed, n_items)
    assert torch.isfinite(ref_loss)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    for n, g in ref_grads.items():
        scale = float(g.abs().max())
        assert scale > 0, n
        assert float((grads[n] - g).abs().max()) <= 1e-4 * scale, n


@pytest.mark.parametrize("impl", IMPLS)
def test_a_sample_cannot_see_another(models, processor, impl):
    """Changing sample B's tokens leaves sample A's (and C's) per-token logits unchanged."""
    model = get(models, impl)
    s = samples_for(processor)[:3]
    pad_id = processor.tokenizer.pad_token_id
    b1 = collate_packed(s, pad_id)
    s2 = list(s)
    ids = s[1]["input_ids"].clone()
    text = ids != model.image_token_id
    ids[text] = torch.randint(4, model.image_token_id, (int(text.sum()),))
    s2[1] = dict(s[1], input_ids=ids)
    b2 = collate_packed(s2, pad_id)
    cu = b1["cu_seqlens"].tolist()
    try:
        with torch.no_grad():
            l1, l2 = model.logits(**b1)[0], model.logits(**b2)[0]  # [T, V]
            alone = model.logits(**collate([s[0]], pad_id))[0]
    except Exception as e:  # noqa: BLE001
        if impl == "flex_attention":
            pytest.skip(f"flex_attention does not run on this CPU build: {e}")
        raise
    a, bb, c = slice(cu[0], cu[1]), slice(cu[1], cu[2]), slice(cu[2], cu[3])
    assert not torch.allclose(l1[bb], l2[bb])  # B itself did change
    torch.testing.assert_close(l1[a], l2[a], rtol=0, atol=1e-6)
    torch.testing.assert_close(l1[c], l2[c], rtol=0, atol=1e-6)
    torch.testing.assert_close(l1[a], alone, rtol=1e-5, atol=1e-5)  # and A packed == A alone


def test_varlen_attention_without_packing_is_sdpa(models, processor):
    """The varlen implementation on a padded batch (generation, eval) is transformers' SDPA with its mask."""
    pad_id = processor.tokenizer.pad_token_id
    s = samples_for(processor)
    for side in ("right", "left"):
        b = collate(s, pad_id, padding_side=side)
        with torch.no_grad():
            ref = models["sdpa"].logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
            got = models["varlen"].logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
        keep = b["attention_mask"].bool()
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_varlen_is_registered_under_its_own_name(models):
    assert models["varlen"].llm.config._attn_implementation == VARLEN


def test_packed_batch_with_tiling_checks_each_sample(encoder_dirs, llm_dir):
    """InternVL tiling: the per-sample tile budget and placeholder check work on a packed batch."""
    model = build(encoder_dirs, llm_dir, "varlen", TilingConfig("internvl", max_tiles=4))
    proc = model.processor()
    s = [sample(proc, k, n) for k, n in enumerate([2, 1, 0])]
    pad_id = proc.tokenizer.pad_token_id
    padded, packed = collate(s, pad_id), collate(s, pad_id, pack=True)
    with torch.no_grad():
        ref, got = model(**padded), model(**packed)
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))
    bad = dict(packed, images_per_sample=packed["images_per_sample"].flip(0))
    with pytest.raises(ValueError, match="image token mismatch in sample"):
        model(**bad)


def test_packing_refuses_an_attention_that_ignores_it(encoder_dirs, llm_dir, processor):
    model = build(encoder_dirs, llm_dir, "sdpa")
    model.llm.config._attn_implementation = "flash_attention_2"  # pretend: not installed here
    b = collate(samples_for(processor), processor.tokenizer.pad_token_id, pack=True)
    with pytest.raises(ValueError, match="packed batch"):
        model(**b)


# ---- selective checkpointing ----------------------------------------------------------------------
def test_gradient_checkpointing_every_and_skip(encoder_dirs, llm_dir, processor):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = build(encoder_dirs, llm_dir, "sdpa")
    b = collate(samples_for(processor), processor.tokenizer.pad_token_id, pack=True)
    n_items = int((b["labels"][:, 1:] != -100).sum())
    ref = loss_and_grads(model, b, n_items)
    layers = [m for m in model.llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    for every, skip, want in [(1, 0, [True, True]), (2, 0, [True, False]), (1, 1, [True, False]),
                              (1, 2, [False, False])]:
        assert model.enable_gradient_checkpointing(every, skip) == want
        assert [m.gradient_checkpointing for m in layers] == want
        loss, grads = loss_and_grads(model, b, n_items)
        torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=0)
        for n, g in ref[1].items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)


# ---- configuration --------------------------------------------------------------------------------
def test_config_options():
    assert DataConfig(path="x", pack=True, pack_max_tokens=4096).pack
    with pytest.raises(ConfigError, match="pack_max_tokens"):
        DataConfig(path="x", pack=True, pack_max_tokens=-1)
    with pytest.raises(ConfigError, match="data.pack"):
        DataConfig(path="x", pack="yes")
    st = StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x"), gradient_checkpointing=True,
                     gradient_checkpointing_every=4, gradient_checkpointing_skip=2)
    assert st.gradient_checkpointing_every == 4
    with pytest.raises(ConfigError, match="gradient_checkpointing_every"):
        StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x"), gradient_checkpointing_every=0)


# ---- the training loop ----------------------------------------------------------------------------
def test_train_stage_packed_update_equals_padded(encoder_dirs, llm_dir, tmp_path, monkeypatch):
    """One optimizer step of vlmkit.train.train_stage (plain SGD: update = -lr * grad) with data.pack on, with
    gradient accumulation (2 packed micro-batches of 2), equals the padded full-batch step; the loop's
    labelled-token count (num_items) works from packed labels."""
    import copy
    import json
    from pathlib import Path

    from vlmkit import train as train_mod
    from vlmkit.config import TrainConfig
    from vlmkit.data import ConversationDataset

    (tmp_path / "img").mkdir()
    recs = []
    for i, a in enumerate(ANSWERS):
        Image.new("RGB", (16, 16), COLORS[i % 3]).save(tmp_path / "img" / f"{i}.png")
        recs.append({"id": i, "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTIONS[i]}, {"from": "gpt", "value": a}]})
    path = str(tmp_path / "d.json")
    Path(path).write_text(json.dumps(recs))
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    base = build(encoder_dirs, llm_dir, "varlen")

    def step(pack: bool, per_device: int):
        model = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        st = StageConfig(name="s", train={"connector": "full", "llm": "full"}, lr=0.5, max_steps=1,
                         global_batch_size=4, per_device_batch_size=per_device, max_grad_norm=0.0, warmup_ratio=0.0,
                         data=DataConfig(path=path, max_length=128, num_workers=0, pack=pack))
        acc = train_mod.make_accelerator(TrainConfig(log_with=None), cpu=True)
        ds = ConversationDataset(path, model.processor(), max_length=128)
        m = train_mod.train_stage(acc, model, st, ds, tmp_path)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, m

    padded, m_pad = step(False, 4)
    packed, m_pack = step(True, 2)
    assert m_pack["samples"] == m_pad["samples"] == 4
    assert abs(m_pack["final_loss"] - m_pad["final_loss"]) <= 1e-5 * abs(m_pad["final_loss"])
    assert any(d.abs().max() > 0 for n, d in padded.items() if n.startswith("llm."))
    for n in padded:
        torch.testing.assert_close(packed[n], padded[n], atol=2e-6, rtol=1e-4, msg=n)
