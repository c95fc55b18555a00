"""The language model: any AutoModelForCausalLM with its tokenizer, the image placeholder added once."""
from __future__ import annotations

import shutil
import tempfile

import torch
from torch import nn
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..config import LLMConfig, QuantizationConfig
from ..extras import require


def load_tokenizer(path: str, image_token: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    add_image_token(tok, image_token)
    if tok.pad_token is None:  # LLaVA pads Vicuna with <unk>; fall back to EOS
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "right"
    return tok


def add_image_token(tok: PreTrainedTokenizerBase, image_token: str) -> int:
    """Add the placeholder as one special token (no-op when present); returns its id."""
    if image_token not in tok.get_vocab():
        tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    ids = tok(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"image token {image_token!r} tokenizes to {ids}, expected one id")
    return ids[0]


def check_quantization_support() -> None:
    """Raise a clear error where 4-bit quantization (llm.quantization) cannot run."""
    if not torch.cuda.is_available():
        raise RuntimeError("llm.quantization (4-bit QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit training "
                           "kernels run on CUDA, and this machine has none. Remove `quantization` from the llm "
                           "config to train in full precision (LoRA works without it).")
    require("bitsandbytes", "qlora", "llm.quantization (4-bit QLoRA)")


def bnb_config(q: QuantizationConfig):
    """The transformers BitsAndBytesConfig for a QuantizationConfig."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_use_double_quant=q.double_quant)


def is_quantized(module: nn.Module) -> bool:
    """True when some of the module's weights are bitsandbytes 4-bit tensors."""
    return any(type(p).__name__ == "Params4bit" for p in module.parameters())


def prepare_quantized(model: nn.Module) -> None:
    """Ready a 4-bit LLM for QLoRA: every base weight frozen (adapters added later are the only trainable part).

    Unlike peft's prepare_model_for_kbit_training, the unquantized weights (norms, embeddings, head) are
    not upcast to fp32: they are frozen, RMSNorm already computes its statistics in fp32, and an fp32
    norm weight turns the norm's output, hence the residual stream, into fp32: twice the activation
    memory, no flash attention, and a plain (non-autocast) forward fails where the fp32 hidden state
    meets the bf16 output head. peft's `enable_input_require_grads` is not needed either: vlmkit
    checkpoints with use_reentrant=False, which does not need inputs that require grad.
    """
    model.requires_grad_(False)


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase, dtype=None):
    """The causal LM from a hub id / local dir or from a config; embeddings cover the tokenizer.

    With `cfg.quantization` the linear layers load as bitsandbytes 4-bit (CUDA only). A random LLM is
    then built in the compute dtype, saved to a temporary folder and loaded back quantized: the same
    from_pretrained path a checkpoint takes.
    """
    from .attention import resolve

    kw = {"attn_implementation": resolve(cfg.attn_implementation)} if cfg.attn_implementation else {}
    q = cfg.quantization
    if q is not None:
        check_quantization_support()
        kw["quantization_config"] = bnb_config(q)
        dtype = dtype or getattr(torch, q.compute_dtype)
    if cfg.path:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                     **kw)
    else:
        d = dict(cfg.config)
        d.setdefault("vocab_size", len(tokenizer))  # a random LLM gets exactly the tokenizer's vocabulary
        hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        if q is None:
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **kw)
        else:
            tmp = tempfile.mkdtemp(prefix="vlmkit-llm-")
            try:
                full = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
                full.save_pretrained(tmp)
                del full  # freed before the quantized copy loads
                model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **kw)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model
