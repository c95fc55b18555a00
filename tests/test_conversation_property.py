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
