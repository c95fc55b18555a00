"""Stage plans beyond frozen/full: LoRA (peft), partial encoder tuning, per-component learning rates."""
from __future__ import annotations

import pytest
import torch

from conftest import model_config
from vlmkit.config import ComponentPlan, ConfigError, DataConfig, StageConfig
from vlmkit.stages import apply_stage, format_table, param_groups, partial_blocks, validate_plan


@pytest.fixture
def fresh(encoder_dirs, llm_dir):
    from vlmkit import VLM

    torch.manual_seed(0)
    return VLM.from_config(model_config(encoder_dirs["clip"], llm_dir))


def stage(train, **kw):
    return StageConfig(name="s", train=train, data=DataConfig(path="x.json"), **kw)


def batch(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = model.count_image_tokens(16, 16)
    ids = torch.randint(4, len(model.tokenizer) - 1, (n, 6 + k), generator=g)
    ids[:, 1:1 + k] = model.image_token_id
    labels = ids.clone()
    labels[:, :1 + k] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(n, 3, 16, 16, generator=g)}


def train_steps(model, st, steps=3):
    apply_stage(model, st.train, st.lr)
    opt = torch.optim.AdamW(param_groups(model, st), lr=st.lr)
    for i in range(steps):
        model(**batch(model, seed=i)).backward()
        opt.step()
        opt.zero_grad()


def test_plan_parsing_and_errors():
    st = stage({"connector": "full", "llm": {"mode": "lora", "r": 4, "lr": 3e-4}})
    assert st.train["connector"] == ComponentPlan(mode="full")
    assert (st.train["llm"].mode, st.train["llm"].r, st.train["llm"].lr) == ("lora", 4, 3e-4)
    with pytest.raises(ConfigError, match="mode 'half'"):
        stage({"llm": "half"})
    with pytest.raises(ConfigError, match="unknown keys \\['rank'\\]"):
        stage({"llm": {"mode": "lora", "rank": 4}})
    with pytest.raises(ConfigError, match="trains nothing"):
        stage({"llm": "frozen"})
    with pytest.raises(ConfigError, match="partial needs"):
        stage({"encoder": "partial"})


def test_validate_plan_names_what_is_wrong(fresh):
    with pytest.raises(ValueError, match="unknown component 'vision'.*encoder, connector, llm"):
        validate_plan(fresh, stage({"vision": "full"}))
    with pytest.raises(ValueError, match="match no Linear layer"):
        validate_plan(fresh, stage({"llm": {"mode": "lora", "target_modules": ["qkv_nonexistent"]}}))
    with pytest.raises(ValueError, match="only 2 block"):  # 3 blocks, feature_layer -2 uses 2
        validate_plan(fresh, stage({"encoder": {"mode": "partial", "layers": 3}}))


def test_lora_stage_leaves_base_weights_bitwise_unchanged(fresh):
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    st = stage({"connector": "full", "llm": {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}, lr=1e-2)
    train_steps(fresh, st)
    state = fresh.state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(k.startswith("llm.") for k in lora_keys)
    after = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("connector.") for k in changed), changed
    assert any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # adapters did learn


def test_lora_save_load_and_merge(fresh, tmp_path):
    st = stage({"connector": "full", "llm": {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}, lr=1e-2)
    train_steps(fresh, st)
    fresh.eval()
    b = batch(fresh, seed=7)
    ref = fresh.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])

    fresh.save_pretrained(tmp_path / "m")
    d = tmp_path / "m" / "adapters" / "llm"
    assert (d / "adapter_config.json").exists() and (d / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    keys = list(load_file(str(d / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") and "lora_" in k for k in keys)  # peft's layout
    assert not any("lora_" in k or "base_layer" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))

    from vlmkit import VLM

    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert "llm" in loaded.adapters
    assert torch.equal(loaded.logits(b["input_ids"], b["attention_mask"], b["pixel_values"]), ref)

    loaded.merge_lora()
    assert not loaded.adapters and not any("lora_" in k for k in loaded.state_dict())
    merged = loaded.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)  # float32 re-association only


def test_partial_encoder_trains_only_the_last_used_blocks(fresh):
    rows = apply_stage(fresh, {"encoder": ComponentPlan(mode="partial", layers=1), "connector": "full"}, 1e-3)
    blocks = list(fresh.encoder.model.encoder.layers)
    assert [any(p.requires_grad for p in b.parameters()) for b in blocks] == [False, True, False]
    enc = next(r for r in rows if r["component"] == "encoder")
    assert enc["trainable"] == sum(p.numel() for p in blocks[1].parameters())


def test_per_component_learning_rates_and_no_decay_on_norms(fresh):
    st = stage({"connector": {"mode": "full", "lr": 1e-3}, "llm": "full"}, lr=2e-5, weight_decay=0.1)
    rows = apply_stage(fresh, st.train, st.lr)
    groups = {g["name"]: g for g in param_groups(fresh, st)}
    assert groups["connector/decay"]["lr"] == 1e-3 and groups["llm/decay"]["lr"] == 2e-5
    assert all(p.ndim >= 2 for p in groups["llm/decay"]["params"]) and groups["llm/decay"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups["llm/no_decay"]["params"])  # norms and biases
    assert groups["llm/no_decay"]["weight_decay"] == 0.0
    n_trainable = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    table = format_table(rows)
    assert "connector" in table and "0.001" in table and "Frozen" in table


def test_shipped_plans_validate_against_a_model_they_fit(llm_dir):
    """LLaVA-1.5, LLaVA-NeXT-style (encoder at a lower rate, image_newline) and InternVL-style
    (last 12 encoder blocks) plans: each checks out against an AnyRes model deep enough for them."""
    from pathlib import Path

    from vlmkit import VLM
    from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig, TilingConfig, load_stages

    cfg = ModelConfig(encoder=EncoderConfig(name="clip", config=dict(
        model_type="clip_vision_model", image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
        num_hidden_layers=14, num_attention_heads=2)), connector=ConnectorConfig("mlp2x_gelu"),
        llm=LLMConfig(path=llm_dir), tiling=TilingConfig("anyres", "(1x1),...,(2x2)"))
    model = VLM.from_config(cfg)
    plans = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "plans"
    for name in ("llava15", "llava_next", "internvl"):
        stages, _ = load_stages(plans / f"{name}.yaml")
        for st in stages:
            validate_plan(model, st)
            rows = {r["component"]: r for r in apply_stage(model, st.train, st.lr)}
            groups = param_groups(model, st)
            assert sum(p.numel() for g in groups for p in g["params"]) == sum(r["trainable"] for r in rows.values())
    # the last stage applied is InternVL's finetune: 12 of the 13 blocks that feed the features
    blocks = list(model.encoder.model.encoder.layers)
    assert [any(p.requires_grad for p in b.parameters()) for b in blocks] == [False] + [True] * 12 + [False]
    assert {g["lr"] for g in param_groups(model, stages[-1]) if g["name"].startswith("encoder")} == {4e-6}


def test_lora_on_the_encoder_trains_and_round_trips(fresh, tmp_path):
    st = stage({"encoder": {"mode": "lora", "r": 2, "alpha": 4, "dropout": 0.0}, "connector": "full"}, lr=1e-2)
    before = {k: v.clone() for k, v in fresh.encoder.state_dict().items()}
    train_steps(fresh, st, steps=2)
    enc = fresh.encoder.state_dict()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in enc.items())  # gradients reached the encoder
    base = {k.replace(".base_layer.", "."): v for k, v in enc.items() if "lora_" not in k}
    assert base.keys() == before.keys() and all(torch.equal(before[k], base[k]) for k in before)  # untouched
    fresh.eval()
    b = batch(fresh, seed=3)
    ref = fresh.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])
    fresh.save_pretrained(tmp_path / "m")
    from vlmkit import VLM

    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert set(loaded.adapters) == {"encoder"}
    assert torch.equal(loaded.logits(b["input_ids"], b["attention_mask"], b["pixel_values"]), ref)
