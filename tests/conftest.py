"""Shared fixtures: in-process tokenizers, tiny random encoders / LLMs saved with save_pretrained.

Nothing here touches the network: every "pretrained" part is a tiny random model written to a
temp dir and loaded back through the same path (`EncoderConfig.path`, `LLMConfig.path`) a hub id takes.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the models here are tiny: one thread is ~25x faster than two on a shared 2-core machine
torch.set_num_threads(1)

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from vlmkit.config import ConnectorConfig, EncoderConfig, LLMConfig, ModelConfig  # noqa: E402
from vlmkit.data.conversation import VICUNA_SYSTEM  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# ChatML with an explicit BOS: the `tokenizer` template must not add a second one
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    VICUNA_SYSTEM, "USER: ASSISTANT: user assistant system",
    "Describe the image. What color is the shape? How many shapes are there?",
    "a red circle a green square a blue triangle a yellow circle in the top left bottom right",
    "one two three four zero yes no hello world picture shows",
]
WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer does


def words(text: str) -> list[str]:
    """Word-level pieces of `text`, computed by hand (independent of the tokenizer)."""
    return WORD_RE.findall(text)


def make_wordlevel_tokenizer(out_dir, texts=CORPUS, chat_template: str | None = CHATML, bos: str | None = "<s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    kw = {"bos_token": bos} if bos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], **kw)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


def make_bpe_tokenizer(out_dir, texts=CORPUS, chat_template: str | None = CHATML):
    """A tiny byte-level BPE (lossless: decode(encode(x)) == x), like GPT-2 / Llama-3 / Qwen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


# ---- tiny encoder configs (one per family / variant) --------------------------------------------
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
ENCODER_CASES = {
    # case: (registry name, transformers config kwargs with model_type)
    "clip": ("clip", dict(model_type="clip_vision_model", image_size=16, patch_size=4, **_VIT)),
    "siglip": ("siglip2", dict(model_type="siglip_vision_model", image_size=16, patch_size=4, **_VIT)),
    "siglip2_naflex": ("siglip2", dict(model_type="siglip2_vision_model", num_patches=16, patch_size=4, **_VIT)),
    "dinov2": ("dinov2", dict(model_type="dinov2", image_size=16, patch_size=4, **_VIT)),
    "dinov2_registers": ("dinov2", dict(model_type="dinov2_with_registers", image_size=16, patch_size=4,
                                        num_register_tokens=4, **_VIT)),
    "internvit": ("internvit", dict(model_type="internvl_vision", image_size=16, patch_size=4, **_VIT)),
}
IMAGE_SIZE = 16
PATCHES = (16 // 4) ** 2  # 16 patch tokens per image for every case

LLM_KW = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=256)


# ---- several processes on this machine ---------------------------------------------------------------------
# `accelerate launch` with torch's standalone rendezvous: the launcher binds port 0 and keeps that socket, and
# the processes connect to it. A port picked here (bound, closed, handed on) can be taken by anyone before the
# launcher binds it again. accelerate has no flag for it; torchrun takes --standalone from PET_STANDALONE, and
# accelerate builds torchrun's options over the environment's, so no --main_process_port is given. The
# processes see a run id other than "none" (TORCHELASTIC_RUN_ID) only under it.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def launch_env(**overrides: str) -> dict:
    """The environment for an ACCELERATE_LAUNCH subprocess: standalone rendezvous, plus `overrides`."""
    return dict(os.environ, PET_STANDALONE="1", **overrides)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return make_wordlevel_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    """The word-level tokenizer as the model loads it (image token added, pad set)."""
    from vlmkit.llm import load_tokenizer

    return load_tokenizer(tok_dir, "<image>")


def save_llm(out_dir, tok_dir, tie: bool = True, seed: int = 0, **overrides):
    """A tiny random Llama + its tokenizer written like a hub checkpoint (no <image> token yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(LLM_KW, vocab_size=len(tok), tie_word_embeddings=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory, tok_dir):
    return save_llm(tmp_path_factory.mktemp("llm_tied"), tok_dir, tie=True)


@pytest.fixture(scope="session")
def llm_dir_untied(tmp_path_factory, tok_dir):
    return save_llm(tmp_path_factory.mktemp("llm_untied"), tok_dir, tie=False, seed=1)


def build_hf_encoder(case: str, seed: int = 0):
    from transformers import AutoConfig, AutoModel

    kw = dict(ENCODER_CASES[case][1])
    torch.manual_seed(seed)
    return AutoModel.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


@pytest.fixture(scope="session")
def encoder_dirs(tmp_path_factory):
    """case -> a save_pretrained dir of that tiny random vision model."""
    out = {}
    for case in ENCODER_CASES:
        d = tmp_path_factory.mktemp(f"enc_{case}")
        build_hf_encoder(case).save_pretrained(str(d))
        out[case] = str(d)
    return out


def model_config(encoder_path: str, llm_path: str, case: str = "clip", feature_layer: int = -2,
                 template: str = "vicuna_v1") -> ModelConfig:
    return ModelConfig(encoder=EncoderConfig(name=ENCODER_CASES[case][0], path=encoder_path,
                                             feature_layer=feature_layer),
                       connector=ConnectorConfig("mlp2x_gelu"), llm=LLMConfig(path=llm_path), template=template)


@pytest.fixture(scope="session")
def vlm(encoder_dirs, llm_dir):
    """CLIP (tiny) + mlp2x_gelu + tied tiny Llama, loaded from save_pretrained dirs. Do not mutate."""
    from vlmkit import VLM

    torch.manual_seed(0)
    model = VLM.from_config(model_config(encoder_dirs["clip"], llm_dir))
    return model.eval()


@pytest.fixture(scope="session")
def processor(vlm):
    return vlm.processor()


def build_for_export(cfg, seed: int = 0):
    """A VLM from `cfg` for export tests: fixed seed, eval mode, and the random connector's biases made
    non-zero too (so a dropped or misplaced bias shows in the logits)."""
    from vlmkit import VLM

    torch.manual_seed(seed)
    model = VLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.connector.parameters():
            p.normal_(0, 0.5)
    return model
