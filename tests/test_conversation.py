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
