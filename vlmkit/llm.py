"""The language model: any AutoModelForCausalLM with its tokenizer, the image placeholder added once."""
from __future__ import annotations

from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import LLMConfig


def load_tokenizer(path: str, image_token: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
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


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase, dtype=None):
    """The causal LM from a hub id / local dir or from a config; embeddings cover the tokenizer."""
    kw = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.path:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **kw)
    else:
        d = dict(cfg.config)
        d.setdefault("vocab_size", len(tokenizer))  # a random LLM gets exactly the tokenizer's vocabulary
        hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **kw)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model
