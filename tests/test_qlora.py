"""QLoRA: a 4-bit (bitsandbytes NF4) LLM inside a VLM, trained through LoRA adapters only.

The training test needs CUDA and bitsandbytes and is skipped elsewhere; the config and the clear
errors (no CUDA, no bitsandbytes, a full stage on a quantized LLM) are checked everywhere.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import ENCODER_CASES, LLM_KW
from vlmkit.config import (ConfigError, ConnectorConfig, DataConfig, EncoderConfig, LLMConfig, ModelConfig,
                           QuantizationConfig, StageConfig, from_dict)

HAS_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
DEVICE = "cuda"
QLORA_KW = dict(LLM_KW, hidden_size=64, intermediate_size=128)  # 4-bit blocks of 64 values


def qlora_config(tok_dir, **quant) -> ModelConfig:
    return ModelConfig(encoder=EncoderConfig(name="clip", config=dict(ENCODER_CASES["clip"][1])),
                       connector=ConnectorConfig("mlp2x_gelu"),
                       llm=LLMConfig(config=dict(QLORA_KW), tokenizer=tok_dir, quantization=quant or {}))


def test_quantization_config_parsing():
    llm = from_dict(LLMConfig, {"path": "x", "quantization": {"load_in_4bit": True, "quant_type": "nf4",
                                                              "compute_dtype": "bfloat16", "double_quant": True}})
    assert llm.quantization == QuantizationConfig()
    assert from_dict(LLMConfig, {"path": "x"}).quantization is None
    assert LLMConfig(path="x", quantization={"quant_type": "fp4"}).quantization.quant_type == "fp4"
    with pytest.raises(ConfigError, match="quant_type must be one of nf4, fp4"):
        LLMConfig(path="x", quantization={"quant_type": "int3"})
    with pytest.raises(ConfigError, match="only load_in_4bit: true"):
        LLMConfig(path="x", quantization={"load_in_4bit": False})
    with pytest.raises(ConfigError, match="compute_dtype"):
        LLMConfig(path="x", quantization={"compute_dtype": "bf16"})
    with pytest.raises(ConfigError, match="unknown keys \\['bits'\\]"):
        from_dict(LLMConfig, {"path": "x", "quantization": {"bits": 4}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_quantization_without_cuda_is_a_clear_error(tok_dir):
    from vlmkit import VLM

    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*Remove `quantization`"):
        VLM.from_config(qlora_config(tok_dir))


def test_quantization_without_bitsandbytes_is_a_clear_error(tok_dir, monkeypatch):
    from vlmkit import VLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"llm.quantization \(4-bit QLoRA\) needs the bitsandbytes package, which is "
                       r"not installed .*: pip install 'vlmkit\[qlora\]' \(or pip install bitsandbytes\)"):
        VLM.from_config(qlora_config(tok_dir))


def _batch(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = model.count_image_tokens(16, 16)
    ids = torch.randint(7, len(model.tokenizer) - 1, (n, 8 + k), generator=g)
    ids[:, 1:1 + k] = model.image_token_id
    labels = ids.clone()
    labels[:, :1 + k] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
         "pixel_values": torch.randn(n, 3, 16, 16, generator=g)}
    return {key: v.to(DEVICE) for key, v in b.items()}


def test_qlora_trains_only_adapters(tok_dir, tmp_path):
    if not HAS_QLORA:
        pytest.skip("QLoRA needs CUDA and bitsandbytes (4-bit kernels); "
                    f"here: cuda={torch.cuda.is_available()}, "
                    f"bitsandbytes={importlib.util.find_spec('bitsandbytes') is not None}")
    from vlmkit import VLM
    from vlmkit.llm import is_quantized
    from vlmkit.stages import apply_stage, param_groups, validate_plan

    torch.manual_seed(0)
    model = VLM.from_config(qlora_config(tok_dir), dtype=torch.bfloat16).to(DEVICE)
    assert is_quantized(model.llm)
    st = StageConfig(name="qlora", train={"llm": {"mode": "lora", "r": 8, "alpha": 16, "dropout": 0.0}},
                     data=DataConfig(path="x.json"), lr=1e-2)
    validate_plan(model, st)
    with pytest.raises(ValueError, match="4-bit quantized weights.*not full"):
        apply_stage(model, {"llm": "full"})
    apply_stage(model, st.train, st.lr)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if type(p).__name__ == "Params4bit"}
    assert len(base) == QLORA_KW["num_hidden_layers"] * 7  # q k v o gate up down
    model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(param_groups(model, st), lr=st.lr)
    b = _batch(model)
    losses = []
    for _ in range(3):
        loss = model(**b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    for n, p in model.llm.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), f"4-bit base weight {n} changed"
    # saved with the base dequantized: a plain bf16 model + the adapter, loadable without bitsandbytes
    model.eval()
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        ref = model.logits(**{k: b[k] for k in keys}).float()
    model.save_pretrained(tmp_path / "m")
    back = VLM.from_pretrained(tmp_path / "m").to(DEVICE).eval()
    assert back.config.llm.quantization is None and not is_quantized(back.llm) and "llm" in back.adapters
    with torch.no_grad():
        out = back.logits(**{k: b[k] for k in keys}).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
