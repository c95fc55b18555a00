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


def chain_merges(vocab: dict[str, int], words: list[str]) -> list[tuple[str, str]]:
    """Each word (and its prefixes) added to `vocab`, with the BPE merges that build it left to right, in word
    order. Words are whole tokens and no merge crosses a word boundary, so expected tokens follow by hand."""
    merges: list[tuple[str, str]] = []  # earlier words' merges rank first
    for w in words:
        for k in range(2, len(w) + 1):
            if (w[:k - 1], w[k - 1]) not in merges:
                merges.append((w[:k - 1], w[k - 1]))
            vocab.setdefault(w[:k], len(vocab))
    return merges


# Llama-2's chat template (BOS before each user turn; the answer framed by spaces, then EOS)
LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA_WORDS = [  # with the prefix space (sentencepiece's "▁"); `USER` and `What` without it, and no `▁USER`
    *dict.fromkeys("\u2581" + w for w in re.findall(r"[a-zA-Z]+", VICUNA_SYSTEM) if w != "s"), "\u2581ASSISTANT",
    *("\u2581" + w for w in "What color is the shape How many shapes are there red two circle".split()),
    "USER", "What",
]


def make_llama_tokenizer(out_dir, chat_template: str | None = LLAMA2_CHAT):
    """A Llama / Vicuna-style tokenizer, built offline: transformers' LlamaTokenizer (BPE, byte fallback, no
    normalizer, Metaspace pre-tokenizer with prepend_scheme "first", split=False: legacy=False) over a hand-made
    vocabulary: <unk> <s> </s> (0, 1, 2), the 256 byte tokens <0x00>..<0xFF>, "\u2581" and printable ASCII, then
    LLAMA_WORDS. `USER` is one token, `\u2581USER` is not: a separately tokenized `USER:` becomes `\u2581 USER :`,
    `</s>USER:` becomes `</s> USER :`."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "\u2581" + "".join(chr(i) for i in range(33, 127)):
        vocab.setdefault(c, len(vocab))
    merges = chain_merges(vocab, LLAMA_WORDS)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_prefix_space=True, add_bos_token=True)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet): printable Latin-1 bytes map to
    themselves, the others to chr(256 + n) in byte order (space -> "Ġ", newline -> "Ċ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def byte_level(text: str) -> str:
    """`text` as byte-level BPE characters (its UTF-8 bytes through `byte_chars`)."""
    t = byte_chars()
    return "".join(t[b] for b in text.encode("utf-8"))


# Qwen2's ChatML template: a default system turn, each turn framed by <|im_start|> ... <|im_end|>\n
QWEN2_CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN_WORDS = [*(byte_level(" " + w) for w in "are a helpful assistant color is the shape many shapes there".split()),
              "system", "user", "assistant", "You", "What", "How", "red", "two"]  # "Ġword" merges rank first


def make_qwen2_tokenizer(out_dir, chat_template: str | None = QWEN2_CHATML):
    """A Qwen2-style tokenizer, built offline: transformers' Qwen2Tokenizer (NFC, Qwen's split regex, byte-level
    BPE) over the 256 byte characters and QWEN_WORDS; no BOS, EOS <|im_end|>, pad <|endoftext|>, ChatML."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_chars().values())}
    merges = chain_merges(vocab, QWEN_WORDS)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
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
