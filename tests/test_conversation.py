"""Label masking by construction, exact to the token, and bad samples that must be refused."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHATML, make_bpe_tokenizer, make_wordlevel_tokenizer, words
from vlmkit.data.conversation import IGNORE, VICUNA_SYSTEM, SampleError, encode, get_template, normalize, truncate
from vlmkit.llm import load_tokenizer

IMG = "<image>"
CONV = [
    {"from": "human", "value": "<image>\nWhat color is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "two shapes"},
]


def ids_of(tok, pieces):
    out = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in out, f"test text not in the test vocabulary: {pieces}"
    return out


def run_encode(tok, template, conv=CONV, n_tokens=(5,), gen=False):
    img_id = tok.convert_tokens_to_ids(IMG)
    return encode(normalize(conv), tok, get_template(template), IMG, img_id, list(n_tokens), gen)


def test_vicuna_v1_multi_turn_exact(tokenizer):
    tok = tokenizer
    img, bos, eos = tok.convert_tokens_to_ids(IMG), tok.bos_token_id, tok.eos_token_id
    ids, labels = run_encode(tok, "vicuna_v1", n_tokens=(5,))
    # LLaVA v1: "<s>SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    p1 = ids_of(tok, words(VICUNA_SYSTEM) + ["USER", ":"])
    p2 = ids_of(tok, words("What color is the shape?") + ["ASSISTANT", ":"])
    a1 = ids_of(tok, ["red"]) + [eos]
    p3 = ids_of(tok, words("USER: How many shapes are there? ASSISTANT:"))
    a2 = ids_of(tok, ["two", "shapes"]) + [eos]
    exp_ids = [bos] + p1 + [img] * 5 + p2 + a1 + p3 + a2
    exp_labels = [IGNORE] * (1 + len(p1) + 5 + len(p2)) + a1 + [IGNORE] * len(p3) + a2
    assert ids == exp_ids
    assert labels == exp_labels
    assert ids.count(bos) == 1 and ids.count(img) == 5


def test_vicuna_generation_prompt(tokenizer):
    tok = tokenizer
    ids, labels = run_encode(tok, "vicuna_v1", CONV[:3], n_tokens=(3,), gen=True)
    assert ids[-2:] == ids_of(tok, ["ASSISTANT", ":"])
    assert ids.count(tok.eos_token_id) == 1  # only the first (answered) turn's end
    assert labels[-len(ids_of(tok, words("USER: How many shapes are there? ASSISTANT:"))):] == \
        [IGNORE] * len(words("USER: How many shapes are there? ASSISTANT:"))


def test_plain_template_exact(tokenizer):
    """LLaVA stage 1: <s> <image> caption \\n, only the caption (and its newline) trained."""
    tok = tokenizer
    img, bos = tok.convert_tokens_to_ids(IMG), tok.bos_token_id
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = run_encode(tok, "plain", conv, n_tokens=(4,))
    cap = ids_of(tok, ["a", "red", "circle"])  # the word-level tokenizer drops the "\n"
    assert ids == [bos] + [img] * 4 + cap
    assert labels == [IGNORE] * 5 + cap


def test_plain_template_keeps_newline_with_lossless_tokenizer(tmp_path):
    tok = load_tokenizer(make_bpe_tokenizer(tmp_path / "bpe"), IMG)
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = run_encode(tok, "plain", conv, n_tokens=(2,))
    trained = [t for t in labels if t != IGNORE]
    assert tok.decode(trained) == "a red circle\n"
    assert ids[:3] == [tok.bos_token_id] + [tok.convert_tokens_to_ids(IMG)] * 2


def test_tokenizer_chat_template_exact(tokenizer):
    """The HF chat_template path: segments come from rendering growing prefixes; BOS written once."""
    tok = tokenizer
    assert tok.chat_template == CHATML
    img, bos = tok.convert_tokens_to_ids(IMG), tok.bos_token_id
    s, e = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = run_encode(tok, "tokenizer", n_tokens=(3,))
    u1 = [bos, s] + ids_of(tok, ["user"]) + [img] * 3 + ids_of(tok, words("What color is the shape?")) + [e] + \
        [s] + ids_of(tok, ["assistant"])
    a1 = ids_of(tok, ["red"]) + [e]
    u2 = [s] + ids_of(tok, ["user"] + words("How many shapes are there?")) + [e, s] + ids_of(tok, ["assistant"])
    a2 = ids_of(tok, ["two", "shapes"]) + [e]
    assert ids == u1 + a1 + u2 + a2
    assert labels == [IGNORE] * len(u1) + a1 + [IGNORE] * len(u2) + a2
    assert ids.count(bos) == 1  # the template writes BOS; encode must not add another


def test_tokenizer_template_is_lossless_with_bpe(tmp_path):
    """With a byte-level BPE: the ids decode to exactly the rendered chat (images expanded), and the
    trained ids decode to exactly the assistant answers with their end markers."""
    tok = load_tokenizer(make_bpe_tokenizer(tmp_path / "bpe"), IMG)
    msgs = normalize(CONV)
    ids, labels = run_encode(tok, "tokenizer", n_tokens=(2,))
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == rendered.replace(IMG, IMG * 2)
    spans, cur = [], []
    for t in labels:
        if t == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    spans.append(cur)
    assert [tok.decode(x) for x in spans] == ["red<|im_end|>\n", "two shapes<|im_end|>\n"]
    assert [i for i, l in zip(ids, labels) if l != IGNORE] == [l for l in labels if l != IGNORE]


def test_bos_handling(tmp_path):
    """No BOS token: none added. A template without BOS in a chat_template: none invented."""
    tok = load_tokenizer(make_wordlevel_tokenizer(tmp_path / "nobos", bos=None,
                                                  chat_template=CHATML.replace("{{ bos_token }}", "")), IMG)
    assert tok.bos_token_id is None
    ids, _ = run_encode(tok, "vicuna_v1")
    assert ids[:len(words(VICUNA_SYSTEM))] == ids_of(tok, words(VICUNA_SYSTEM))
    ids, _ = run_encode(tok, "tokenizer")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_image_placeholder_expansion_counts(tokenizer):
    tok = tokenizer
    img = tok.convert_tokens_to_ids(IMG)
    conv = [{"from": "human", "value": "<image> and <image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
    for template in ("vicuna_v1", "tokenizer"):
        ids, labels = run_encode(tok, template, conv, n_tokens=(3, 7))
        assert ids.count(img) == 10
        first = ids.index(img)
        assert ids[first:first + 3] == [img] * 3 and ids[first + 3] != img  # 3 then text then 7
        assert ids[ids.index(img, first + 3):][:7] == [img] * 7
        assert all(lab == IGNORE for t, lab in zip(ids, labels) if t == img)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "tokenizer"])
def test_image_count_mismatch_raises(tokenizer, template):
    with pytest.raises(SampleError, match="image"):
        run_encode(tokenizer, template, n_tokens=(4, 4))  # one <image>, two images
    with pytest.raises(SampleError, match="image"):
        run_encode(tokenizer, template, n_tokens=())  # one <image>, no image


def test_image_count_mismatch_no_placeholder(tokenizer):
    conv = [{"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(SampleError, match="0 <image>"):
        run_encode(tokenizer, "vicuna_v1", conv, n_tokens=(4,))


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "tokenizer"])
def test_no_assistant_turn_raises(tokenizer, template):
    with pytest.raises(SampleError, match="no assistant turn"):
        run_encode(tokenizer, template, CONV[:1])


def test_bad_turn_raises():
    with pytest.raises(SampleError, match="turn 1"):
        normalize([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}])


def test_image_in_assistant_turn_raises(tokenizer):
    conv = [{"from": "human", "value": "<image>\nhello"}, {"from": "gpt", "value": "<image> red"}]
    with pytest.raises(SampleError, match="assistant"):
        run_encode(tokenizer, "vicuna_v1", conv, n_tokens=(2, 2))


def test_truncation(tokenizer):
    img = tokenizer.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(tokenizer, "vicuna_v1", n_tokens=(6,))
    last_img = max(i for i, t in enumerate(ids) if t == img)
    first_trained = min(i for i, t in enumerate(labels) if t != IGNORE)
    # inside the image span (or right after its last token would be cut): refused
    for m in (last_img - 2, last_img):
        with pytest.raises(SampleError, match="image"):
            truncate(ids, labels, m, img)
    # images kept but nothing trained left: refused
    with pytest.raises(SampleError, match="no trained token"):
        truncate(ids, labels, first_trained, img)
    # one trained token left: kept, cut exactly
    t_ids, t_labels = truncate(ids, labels, first_trained + 1, img)
    assert t_ids == ids[:first_trained + 1] and t_labels == labels[:first_trained + 1]
    assert truncate(ids, labels, len(ids), img) == (ids, labels)


@settings(max_examples=60, deadline=None)
@given(n_img=st.integers(1, 8), max_length=st.integers(1, 80))
def test_truncation_never_cuts_images(tokenizer, n_img, max_length):
    img = tokenizer.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(tokenizer, "vicuna_v1", n_tokens=(n_img,))
    try:
        t_ids, t_labels = truncate(ids, labels, max_length, img)
    except SampleError:
        return
    assert len(t_ids) == len(t_labels) == min(max_length, len(ids))
    assert t_ids.count(img) == n_img
    assert any(x != IGNORE for x in t_labels)


def test_vicuna_system_turn_and_chat_format(tokenizer):
    """A system turn replaces the default system prompt; role/content turns equal from/value turns."""
    tok = tokenizer
    conv = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "<image>\nyes"},
            {"role": "assistant", "content": "no"}]
    ids, labels = run_encode(tok, "vicuna_v1", conv, n_tokens=(2,))
    img = tok.convert_tokens_to_ids(IMG)
    prompt = ids_of(tok, ["hello", "world", "USER", ":"]) + [img] * 2 + ids_of(tok, ["yes", "ASSISTANT", ":"])
    answer = ids_of(tok, ["no"]) + [tok.eos_token_id]
    assert ids == [tok.bos_token_id] + prompt + answer
    assert labels == [IGNORE] * (1 + len(prompt)) + answer
    llava = [{"from": "human", "value": "<image>\nyes"}, {"from": "gpt", "value": "no"}]
    assert run_encode(tok, "vicuna_v1", llava, n_tokens=(2,)) == run_encode(tok, "vicuna_v1", conv[1:], n_tokens=(2,))


# ---- sentencepiece-style (Llama / Vicuna) and byte-level (Qwen2) tokenizers ------------------------
# A conversation heavy in unicode and punctuation (byte fallback, NFC, Qwen's split regex at work)
UNI = [
    {"from": "human", "value": "<image>\nWhat's this — «ça»? 日本!!"},
    {"from": "gpt", "value": "Ça coûte 5€... (ok) 🙂"},
    {"from": "human", "value": "How many shapes are there?!"},
    {"from": "gpt", "value": 'two, "red"; shapes'},
]
SP = "\u2581"  # sentencepiece's space


def utf8(text):
    """Byte-fallback tokens of `text` (its UTF-8 bytes as <0xXX>)."""
    return [f"<0x{b:02X}>" for b in text.encode("utf-8")]


def bl(text):
    """Byte-level BPE characters of `text`, one per byte (no merge applies to them)."""
    from conftest import byte_level

    return list(byte_level(text))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import make_llama_tokenizer

    return load_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama")), IMG)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from conftest import make_qwen2_tokenizer

    return load_tokenizer(make_qwen2_tokenizer(tmp_path_factory.mktemp("qwen")), IMG)


def tokens(tok, ids, img_id=None):
    return ["<IMG>" if t == img_id else tok.convert_ids_to_tokens(t) for t in ids]


def trained_runs(tok, ids, labels):
    """The trained tokens, one list per contiguous run (an answer with its end marker)."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == t
            cur.append(tok.convert_ids_to_tokens(t))
    return runs + ([cur] if cur else [])


# VICUNA_SYSTEM with the Llama tokenizer: every word is a "▁word" token, punctuation single characters
LLAMA_SYSTEM = [SP + w if w.isalpha() else w for w in
                ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
                 "helpful , detailed , and polite answers to the user ' s questions .").split()]
LLAMA_SYSTEM[LLAMA_SYSTEM.index("\u2581s")] = "s"  # user's: `▁user` `'` `s`


def test_llama_tokenizer_is_what_it_claims(llama):
    """The test tokenizer itself: legacy=False Metaspace (prefix space only at the start of the string), byte
    fallback, `USER` a token and `▁USER` not, BOS added by the tokenizer."""
    t = lambda s: llama.convert_ids_to_tokens(llama(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert SP + "USER" not in llama.get_vocab() and "USER" in llama.get_vocab()
    assert t("USER:") == [SP, "USER", ":"]
    assert t("</s>USER:") == ["</s>", "USER", ":"]
    assert t("<s>A chat") == ["<s>", "A", SP + "chat"] and t("<s> A chat") == ["<s>", SP + "A", SP + "chat"]
    assert t("日") == [SP] + utf8("日")
    assert llama("A")["input_ids"] == [llama.bos_token_id] + llama("A", add_special_tokens=False)["input_ids"]
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token) == (1, 2, "<unk>")  # pad: <unk>, as LLaVA


def test_bos_glue(llama, qwen, tokenizer, tmp_path):
    from vlmkit.data.conversation import bos_glue

    assert bos_glue(llama) == " "  # `<s> A` gives `<s> ▁A`, as `A` at the start of a string
    assert bos_glue(tokenizer) == "" and bos_glue(qwen) == ""
    assert bos_glue(load_tokenizer(make_bpe_tokenizer(tmp_path / "bpe"), IMG)) == ""


def test_vicuna_v1_llama_multi_turn_exact(llama):
    """`</s>USER:` is `</s> USER :` in turn 2 (not `</s> ▁ USER :`); BOS then `▁A` as LLaVA's tokenizer(prompt)."""
    img = llama.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(llama, "vicuna_v1", n_tokens=(3,))
    a1, a2 = [SP + "red", "</s>"], [SP + "two", SP + "shapes", "</s>"]
    want = (["<s>"] + LLAMA_SYSTEM + [SP, "USER", ":", SP] + ["<IMG>"] * 3 +
            ["<0x0A>", "What", SP + "color", SP + "is", SP + "the", SP + "shape", "?", SP + "ASSISTANT", ":"] + a1 +
            ["USER", ":", SP + "How", SP + "many", SP + "shapes", SP + "are", SP + "there", "?", SP + "ASSISTANT", ":"]
            + a2)
    assert tokens(llama, ids, img) == want
    assert trained_runs(llama, ids, labels) == [a1, a2]
    assert labels[:len(want) - len(a1) - len(a2) - 10] == [IGNORE] * (len(want) - len(a1) - len(a2) - 10)


def test_vicuna_v1_llama_unicode_exact(llama):
    img = llama.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(llama, "vicuna_v1", UNI, n_tokens=(2,))
    q1 = (["<0x0A>", "What", "'", "s", SP + "th", "i", "s", SP] + utf8("—") + [SP] + utf8("«ç") + ["a"] + utf8("»") +
          ["?", SP] + utf8("日本") + ["!", "!", SP + "ASSISTANT", ":"])
    a1 = ([SP] + utf8("Ç") + ["a", SP + "co"] + utf8("û") + ["t", "e", SP, "5"] + utf8("€") + [".", ".", ".", SP, "(",
                                                                                             "o", "k", ")", SP]
          + utf8("🙂") + ["</s>"])
    q2 = ["USER", ":", SP + "How", SP + "many", SP + "shapes", SP + "are", SP + "there", "?", "!", SP + "ASSISTANT",
          ":"]
    a2 = [SP + "two", ",", SP, '"', "r", "e", "d", '"', ";", SP + "shapes", "</s>"]
    head = ["<s>"] + LLAMA_SYSTEM + [SP, "USER", ":", SP, "<IMG>", "<IMG>"]
    assert tokens(llama, ids, img) == head + q1 + a1 + q2 + a2
    assert trained_runs(llama, ids, labels) == [a1, a2]
    # the bytes fuse back into the text when decoded
    assert llama.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == \
        'Ça coûte 5€... (ok) 🙂</s> two, "red"; shapes</s>'


def llava_v1_reference(tok, conv, n_img):
    """LLaVA's preprocess_v1 ids: conversation_lib's vicuna_v1 prompt (sep " ", sep2 "</s>") tokenized as one
    string by `tokenizer(prompt)` (BOS from the tokenizer), each <image> token expanded to n_img placeholders.

    (LLaVA's own `tokenizer_image_token` tokenizes the text between images as separate strings, which gives the
    text right after an image a prefix space; here, as in the exported processor, `<image>` is a token of the one
    string, so `\nWhat` after it is `<0x0A> What`.)"""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    prompt = VICUNA_SYSTEM + " "
    for i, turn in enumerate(conv):
        prompt += roles[turn["from"]] + ": " + turn["value"] + (" " if i % 2 == 0 else "</s>")
    img = tok.convert_tokens_to_ids(IMG)
    out = []
    for t in tok(prompt)["input_ids"]:
        out += [img] * n_img if t == img else [t]
    return out


@pytest.mark.parametrize("conv", [CONV, UNI], ids=["ascii", "unicode"])
def test_vicuna_v1_equals_llava_preprocess_v1(llama, conv):
    ids, _ = run_encode(llama, "vicuna_v1", conv, n_tokens=(4,))
    assert ids == llava_v1_reference(llama, conv, 4)


def test_plain_llama_exact(llama):
    """The caption follows the image token in one string: `a` without the prefix space (what the exported template
    gives at inference), the newline a byte token; no glue space between BOS and the image."""
    img = llama.convert_tokens_to_ids(IMG)
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = run_encode(llama, "plain", conv, n_tokens=(2,))
    cap = ["a", SP + "red", SP + "circle", "<0x0A>"]
    assert tokens(llama, ids, img) == ["<s>", "<IMG>", "<IMG>"] + cap
    assert trained_runs(llama, ids, labels) == [cap]


def test_llama2_chat_template_exact(llama):
    """The tokenizer's own Llama-2 chat template, tokenized as one string: `<s>[INST]` has no prefix space
    (legacy=False); each answer is trained with its ` </s>`."""
    img = llama.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(llama, "tokenizer", n_tokens=(2,))
    inst, end = ["[", "I", "N", "S", "T", "]"], [SP, "[", "/", "I", "N", "S", "T", "]"]
    a1, a2 = [SP + "red", SP, "</s>"], [SP + "two", SP + "shapes", SP, "</s>"]
    want = (["<s>"] + inst + [SP, "<IMG>", "<IMG>", "<0x0A>", "What", SP + "color", SP + "is", SP + "the", SP + "shape",
                              "?"] + end + a1 +
            ["<s>"] + inst + [SP + "How", SP + "many", SP + "shapes", SP + "are", SP + "there", "?"] + end + a2)
    assert tokens(llama, ids, img) == want
    assert trained_runs(llama, ids, labels) == [a1, a2]


QWEN_SYSTEM = ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>", "Ċ"]


def test_qwen2_chatml_unicode_exact(qwen):
    """Qwen2-style byte-level BPE with its ChatML template (default system turn), tokenized as one string."""
    img = qwen.convert_tokens_to_ids(IMG)
    ids, labels = run_encode(qwen, "tokenizer", UNI, n_tokens=(2,))
    user, asst, end = ["<|im_start|>", "user", "Ċ"], ["<|im_start|>", "assistant", "Ċ"], ["<|im_end|>", "Ċ"]
    q1 = (["<IMG>", "<IMG>", "Ċ", "What", "'", "s", "Ġth", "i", "s"] + bl(" —") + bl(" «") + bl("ç") + ["a"] +
          bl("»?") + bl(" 日本") + ["!", "!"])
    a1 = (bl("Ç") + ["a", "Ġco"] + bl("û") + ["t", "e", "Ġ", "5"] + bl("€...") + ["Ġ", "(", "o", "k", ")"] + bl(" 🙂")
          + end)
    q2 = ["How", "Ġmany", "Ġshapes", "Ġare", "Ġthere", "?", "!"]
    a2 = ["two", ",", "Ġ", '"', "red", '"', ";", "Ġshapes"] + end
    assert tokens(qwen, ids, img) == QWEN_SYSTEM + user + q1 + end + asst + a1 + user + q2 + end + asst + a2
    assert trained_runs(qwen, ids, labels) == [a1, a2]
    assert qwen.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == \
        'Ça coûte 5€... (ok) 🙂<|im_end|>\ntwo, "red"; shapes<|im_end|>\n'


def test_qwen2_vicuna_v1_exact(qwen):
    """vicuna_v1 with a tokenizer that has no BOS and no `</s>` token: nothing in front, `</s>` is text."""
    img = qwen.convert_tokens_to_ids(IMG)
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
    ids, labels = run_encode(qwen, "vicuna_v1", conv, n_tokens=(1,))
    got = tokens(qwen, ids, img)
    assert got[:2] == ["A", "Ġc"]  # "A chat": no BOS; `Ġchat` is not a token
    i = got.index("<IMG>")
    ass = ["Ġ"] + list("ASSISTANT") + [":"]
    # Qwen's regex splits `</s>USER` as `</` `s` `>USER`; ` two` has no token: `Ġt` (of `Ġthe`'s merges) `w` `o`
    a1, a2 = ["Ġ", "red", "<", "/", "s", ">"], ["Ġt", "w", "o", "<", "/", "s", ">"]
    assert got[i - 7:] == (["Ġ", "U", "S", "E", "R", ":", "Ġ", "<IMG>", "Ċ", "What", "Ġcolor", "Ġis", "Ġthe", "Ġshape",
                            "?"] + ass + a1 + ["U", "S", "E", "R", ":", "Ġ", "How", "Ġmany", "?"] + ass + a2)
    assert trained_runs(qwen, ids, labels) == [a1, a2]


TOKENIZERS = ["wordlevel", "bpe", "llama", "qwen"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory, llama, qwen):
    d = tmp_path_factory.mktemp("toks")
    return {"wordlevel": load_tokenizer(make_wordlevel_tokenizer(d / "w"), IMG),
            "bpe": load_tokenizer(make_bpe_tokenizer(d / "b"), IMG), "llama": llama, "qwen": qwen}


def reference_ids(tok, text, n_img):
    """`text` tokenized as one string (special tokens as written in it), each image token expanded."""
    img = tok.convert_tokens_to_ids(IMG)
    out = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        out += [img] * n_img if t == img else [t]
    return out


@pytest.mark.parametrize("conv", [CONV, UNI], ids=["ascii", "unicode"])
@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "tokenizer"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_ids_are_the_rendered_conversation_and_prompts_are_prefixes(toks, name, template, conv):
    """For every template and tokenizer: the training ids are the ids of the rendered conversation tokenized as one
    string, and the generation prompt of each turn is exactly the training ids before that turn's answer, whose
    first token is trained."""
    from vlmkit.data.conversation import render

    tok = toks[name]
    ids, labels = run_encode(tok, template, conv, n_tokens=(3,))
    text, _ = render(normalize(conv), tok, get_template(template))
    assert ids == reference_ids(tok, text, 3)
    if template == "tokenizer":  # the rendered string is the tokenizer's own chat template's
        assert text == tok.apply_chat_template(normalize(conv), tokenize=False)
    turns = [i for i, t in enumerate(conv) if t["from"] == "gpt"][:1 if template == "plain" else None]
    for i in turns:
        prompt, plabels = run_encode(tok, template, conv[:i], n_tokens=(3,), gen=True)
        assert ids[:len(prompt)] == prompt, (name, template, i)
        assert labels[len(prompt)] != IGNORE and labels[len(prompt) - 1] == IGNORE
    # tokenizers without offsets (Python tokenizers) fall back to one piece at a time: the same ids where
    # pieces do not interact (word-level, byte-level)
    if name in ("wordlevel", "bpe", "qwen"):
        assert run_encode(NoOffsets(tok), template, conv, n_tokens=(3,)) == (ids, labels)


class NoOffsets:
    """A tokenizer that cannot return offsets (as a Python tokenizer)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._tok(text, **kw)


def test_plain_llama_video_first_gets_no_glue_space_in_training_or_export(llama):
    """A caption sample starting with `<video>` (video pre-training under `plain`): like `<image>`, a special token
    takes no prefix space, so no stray `▁` between BOS and it; the exported chat template renders the same text."""
    import jinja2

    from vlmkit.data.conversation import render
    from vlmkit.export.common import template_to_jinja
    from vlmkit.models.llm import add_image_token

    vid = add_image_token(llama, "<video>")
    conv = [{"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = encode(normalize(conv), llama, get_template("plain"), IMG, llama.convert_tokens_to_ids(IMG), [],
                         False, "<video>")
    cap = ["a", SP + "red", SP + "circle", "<0x0A>"]
    assert ids[:2] == [llama.bos_token_id, vid] and tokens(llama, ids[2:], vid) == cap
    assert trained_runs(llama, ids, labels) == [cap]
    text, _ = render(normalize(conv), llama, get_template("plain"), False, IMG, "<video>")
    jinja = template_to_jinja(get_template("plain"), IMG, llama, "<video>")
    msgs = [{"role": "user", "content": "<video>\nDescribe the video."},
            {"role": "assistant", "content": "a red circle"}]
    out = jinja2.Environment().from_string(jinja).render(messages=msgs, bos_token=llama.bos_token,
                                                          eos_token=llama.eos_token, add_generation_prompt=False)
    assert text.startswith("<s><video>") and out == text
