"""A property of conversation formatting (vicuna_v1, lossless byte-level BPE): for any multi-turn
conversation, ids and labels align, labels are -100 or the id, every image expands to its count, and the
trained tokens decode to exactly the assistant answers, each with its end marker."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_bpe_tokenizer
from vlmkit.data.conversation import IGNORE, encode, get_template, normalize
from vlmkit.llm import load_tokenizer

IMG = "<image>"
word = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
words = st.lists(word, min_size=0, max_size=6)


@st.composite
def conversations(draw):
    """(turns in LLaVA form, tokens per image in order of appearance, the assistant answers)."""
    turns, counts, answers = [], [], []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": " ".join(draw(st.lists(word, min_size=1, max_size=5)))})
    for _ in range(draw(st.integers(1, 4))):
        text = draw(words)
        for _ in range(draw(st.integers(0, 2))):  # images anywhere among the words of a user turn
            text.insert(draw(st.integers(0, len(text))), IMG + draw(st.sampled_from(["", "\n"])))
            counts.append(draw(st.integers(1, 5)))
        answer = " ".join(draw(words))
        turns += [{"from": "human", "value": " ".join(text)}, {"from": "gpt", "value": answer}]
        answers.append(answer)
    return turns, counts, answers


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return load_tokenizer(make_bpe_tokenizer(tmp_path_factory.mktemp("bpe_prop")), IMG)


@settings(max_examples=80, deadline=None)
@given(sample=conversations())
def test_encode_properties(bpe, sample):
    turns, counts, answers = sample
    img_id = bpe.convert_tokens_to_ids(IMG)
    ids, labels = encode(normalize(turns), bpe, get_template("vicuna_v1"), IMG, img_id, counts)
    assert len(ids) == len(labels)
    assert all(lab == IGNORE or lab == t for t, lab in zip(ids, labels))
    assert ids.count(img_id) == sum(counts)
    assert all(lab == IGNORE for t, lab in zip(ids, labels) if t == img_id)
    trained = [lab for lab in labels if lab != IGNORE]
    # vicuna_v1: each answer is trained as " " + answer + "</s>"
    assert bpe.decode(trained) == "".join(f" {a}</s>" for a in answers)


# ---- a Llama / Vicuna-style tokenizer (legacy=False Metaspace, byte fallback): LLaVA's preprocess_v1 ids -------
rich_word = st.text("abcdeoUSERATI" + "éü日🙂" + ",.!?'\"()-:", min_size=1, max_size=8)


@st.composite
def rich_conversations(draw):
    turns, counts = [], []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": " ".join(draw(st.lists(rich_word, min_size=1, max_size=4)))})
    for _ in range(draw(st.integers(1, 3))):
        text = draw(st.lists(rich_word, min_size=0, max_size=5))
        for _ in range(draw(st.integers(0, 2))):
            text.insert(draw(st.integers(0, len(text))), IMG + draw(st.sampled_from(["", "\n"])))
            counts.append(draw(st.integers(1, 3)))
        answer = draw(st.sampled_from(["", " "])).join(draw(st.lists(rich_word, max_size=5)))
        turns += [{"from": "human", "value": " ".join(text)}, {"from": "gpt", "value": answer}]
    return turns, counts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import make_llama_tokenizer

    return load_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama_prop")), IMG)


@settings(max_examples=80, deadline=None)
@given(sample=rich_conversations())
def test_llama_vicuna_ids_and_labels_are_llava_preprocess_v1s(llama, sample):
    """Ids: LLaVA's vicuna_v1 prompt tokenized as one string by `tokenizer(prompt)`; labels: exactly the tokens
    between the tokenizations of the prompt up to `ASSISTANT:` and up to the answer's `</s>` (the reference counts
    tokens of growing prefixes; vlmkit builds its labels from offsets). `<image>` is a token of the one string, as
    in the exported processor (see test_conversation.llava_v1_reference)."""
    from conftest import VICUNA_SYSTEM

    turns, counts = sample
    img_id = llama.convert_tokens_to_ids(IMG)

    def expand(ids):
        out, k = [], 0
        for t in ids:
            if t == img_id:
                out += [img_id] * counts[k]
                k += 1
            else:
                out.append(t)
        return out

    system, rest = (turns[0]["value"], turns[1:]) if turns[0]["from"] == "system" else (VICUNA_SYSTEM, turns)
    prompt, trained = system + " ", []
    for t in rest:
        if t["from"] == "human":
            prompt += "USER: " + t["value"] + " "
        else:
            prompt += "ASSISTANT:"
            start = len(expand(llama(prompt)["input_ids"]))
            prompt += " " + t["value"] + "</s>"
            trained.append((start, len(expand(llama(prompt)["input_ids"]))))
    want = expand(llama(prompt)["input_ids"])
    ids, labels = encode(normalize(turns), llama, get_template("vicuna_v1"), IMG, img_id, counts)
    assert ids == want
    assert labels == [t if any(s <= j < e for s, e in trained) else IGNORE for j, t in enumerate(ids)]
