"""Conversations -> token ids and labels, built by construction.

A template turns messages into pieces `(text, trained)`. The pieces are joined into one string, the
conversation as the exported chat template renders it (BOS written as text in front where the template
has one), while the character spans of the trained pieces (assistant answers and their end marker) are
recorded. The string is tokenized once, with offsets, and a token is trained when it starts inside a
trained span, IGNORE (-100) elsewhere. So the ids are exactly those of the rendered conversation tokenized as one
string, as LLaVA's `tokenizer(prompt)` and a served model's chat template give them (a sentencepiece-style
tokenizer tokenizes `</s>USER:` differently from a separate `USER:`), and the labels come from the spans,
not from re-tokenizing and counting. Each `<image>` (one token of the tokenizer) becomes exactly the
number of placeholder ids the model will fill with features. A tokenizer without offsets (a Python
"slow" one) falls back to tokenizing each piece on its own.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from ..registry import TEMPLATES

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A sample that cannot be trained on; the message names the sample and what is wrong.

    `kind` names the problem for counting (`vlmkit check-data`): invalid_sample, no_assistant_turn,
    image_count_mismatch, image_in_assistant_turn, no_trained_token, too_long_for_images, or an
    image problem (missing_image, corrupt_image, image_too_large).
    """

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes (data-loader workers)
        return type(self), (str(self), self.kind)


def normalize(conversations: list[dict]) -> list[dict]:
    """LLaVA `{"from", "value"}` or chat `{"role", "content"}` turns -> `{"role", "content"}`."""
    out = []
    for i, turn in enumerate(conversations):
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise SampleError(f"turn {i}: expected from/value (or role/content) with a known role, got {turn!r}")
        out.append({"role": ROLES[role], "content": content})
    return out


@dataclass(frozen=True)
class Template:
    """A fixed-format chat template: [system][sep] then per turn `role: text` with separators."""

    name: str
    system: str = ""
    user: str = "USER: "
    assistant: str = "ASSISTANT:"
    answer_prefix: str = " "
    sep: str = " "
    end: str = "</s>"
    add_bos: bool = True

    def segments(self, messages: list[dict], add_generation_prompt: bool, tokenizer=None, placeholders=()):
        """Yield (text, trained) pieces of the conversation."""
        system = self.system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        buf = system + self.sep if system else ""
        for m in messages:
            if m["role"] == "user":
                buf += self.user + m["content"] + self.sep + self.assistant
            elif m["role"] == "assistant":
                yield buf, False
                buf = ""
                yield self.answer_prefix + m["content"] + self.end, True
            else:
                raise SampleError(f"a {m['role']} turn in the middle of the conversation")
        if buf and add_generation_prompt:
            yield buf, False


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES.register("vicuna_v1")(Template("vicuna_v1", system=VICUNA_SYSTEM))


@dataclass(frozen=True)
class PlainTemplate:
    """LLaVA's stage-1 caption format: the image, then the caption trained, then a newline."""

    name: str = "plain"
    add_bos: bool = True

    def segments(self, messages, add_generation_prompt, tokenizer=None, placeholders=("<image>",)):
        """`placeholders`: the image token, then the video token when the model takes video; each kept as often
        as the first human turn has it (images first, then videos), its other text dropped."""
        users = [m for m in messages if m["role"] == "user"]
        answers = [m for m in messages if m["role"] == "assistant"]
        if not users:
            raise SampleError("plain template: no human turn")
        yield "".join(p * users[0]["content"].count(p) for p in placeholders), False
        if answers:
            yield answers[0]["content"] + "\n", True


TEMPLATES.register("plain")(PlainTemplate())


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's own `chat_template`, split into segments by rendering growing prefixes.

    The text of assistant turn i is the difference between the rendering of messages[:i+1] and
    that of messages[:i] with the generation prompt; a template that rewrites earlier turns
    (so that a prefix is not a prefix) is refused with a clear error.
    """

    name: str = "tokenizer"
    add_bos: bool = False  # chat templates write their own BOS

    def segments(self, messages, add_generation_prompt, tokenizer=None, placeholders=()):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")

        def render(ms, gen):
            return tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:i], True)
            full = render(messages[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("the tokenizer's chat_template does not render conversations as growing prefixes; "
                                 "use a named template instead")
            yield prompt[len(done):], False
            yield full[len(prompt):], True
            done = full
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            prompt = render(messages, True)
            yield prompt[len(done):], False


TEMPLATES.register("tokenizer")(TokenizerTemplate())


def get_template(name: str):
    return TEMPLATES.get(name)


# ---- the conversation as one string -------------------------------------------------------------
_GLUE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its bos_glue


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_glue(tokenizer) -> str:
    """What goes between the BOS text and a conversation that starts with text, so that the string
    `bos_token + glue + text`, tokenized as one, gives [bos] + the ids of `text` alone (what LLaVA's
    `tokenizer(prompt)` trains on): "" for most tokenizers; " " for a sentencepiece-style one (Metaspace with
    prepend_scheme "first", legacy=False), which gives a word its prefix space only at the start of the string
    (`<s>A` -> `<s> A`, but `<s> A` -> `<s> ▁A`, as `A` alone -> `▁A`). "" when neither gives it."""
    try:
        return _GLUE[tokenizer]
    except (KeyError, TypeError):
        pass
    glue = ""
    bos = tokenizer.bos_token
    if bos is not None:
        probes = ("A chat", "USER: hi")
        for cand in ("", " "):
            if all(_ids(tokenizer, bos + cand + p) == [tokenizer.bos_token_id] + _ids(tokenizer, p) for p in probes):
                glue = cand
                break
    try:
        _GLUE[tokenizer] = glue
    except TypeError:
        pass
    return glue


def bos_text(tokenizer, body: str, placeholders: tuple[str, ...] = ("<image>",)) -> str:
    """The text in front of a conversation rendered by a template with `add_bos`: the BOS token and its glue
    (`bos_glue`; none when the conversation starts with a placeholder, the image or the video token, which gets no
    prefix space either way)."""
    if tokenizer.bos_token is None:
        return ""
    glue = bos_glue(tokenizer)
    if glue and (not body or body.startswith(tuple(placeholders))):
        glue = ""
    return tokenizer.bos_token + glue


def render(messages: list[dict], tokenizer, template, add_generation_prompt: bool = False,
           image_token: str = "<image>", video_token: str | None = None):
    """(the conversation as one string, the character spans [start, end) of its trained pieces).

    The string is what the exported chat template renders for the same messages."""
    marks = (image_token,) + ((video_token,) if video_token else ())
    pieces = [(t, trained) for t, trained in template.segments(messages, add_generation_prompt, tokenizer, marks) if t]
    body = "".join(t for t, _ in pieces)
    text = bos_text(tokenizer, body, marks) if template.add_bos else ""
    spans = []
    for piece, trained in pieces:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def encode(messages: list[dict], tokenizer, template, image_token: str, image_token_id: int,
           tokens_per_image: list[int], add_generation_prompt: bool = False,
           video_token: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; each `<image>` expands to its placeholder count.

    The ids are those of `render(...)`'s string tokenized as one (placeholders aside), the labels those ids
    where a token starts inside a trained span. `tokens_per_image[k]` is the number of placeholders for the
    k-th image (from the one function that counts image tokens). Raises SampleError when the `<image>` count
    differs from the number of images, or nothing is trained (unless generating).
    """
    if not add_generation_prompt and not any(m["role"] == "assistant" for m in messages):
        # checked first: templates drop a trailing prompt, which would otherwise surface as an
        # image-count mismatch for its <image>
        raise SampleError("no assistant turn to train on", "no_assistant_turn")
    text, spans = render(messages, tokenizer, template, add_generation_prompt, image_token, video_token)
    images = [m.start() for m in re.finditer(re.escape(image_token), text)]
    if any(s <= i < e for i in images for s, e in spans):
        raise SampleError("an <image> in an assistant turn", "image_in_assistant_turn")
    if len(images) > len(tokens_per_image):
        raise SampleError(f"more <image> placeholders than images ({len(tokens_per_image)})", "image_count_mismatch")
    if len(images) != len(tokens_per_image):
        raise SampleError(f"{len(images)} <image> placeholder(s) in the text but {len(tokens_per_image)} image(s)",
                          "image_count_mismatch")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a Python tokenizer: no offsets
        ids, labels = _encode_pieces(messages, tokenizer, template, image_token, image_token_id, tokens_per_image,
                                     add_generation_prompt, video_token)
    else:
        ids, labels = _from_offsets(enc["input_ids"], enc["offset_mapping"], spans, images, len(image_token),
                                    image_token, image_token_id, tokens_per_image)
    if not add_generation_prompt and all(x == IGNORE for x in labels):
        raise SampleError("no assistant turn to train on (the answers tokenize to nothing)", "no_trained_token")
    return ids, labels


def _from_offsets(token_ids, offsets, spans, images, width, image_token, image_token_id, tokens_per_image):
    """ids and labels from one tokenization: a token is trained when it starts inside a trained span; the
    token(s) of the k-th `<image>` become tokens_per_image[k] placeholders."""
    ids: list[int] = []
    labels: list[int] = []
    k = 0  # the next image
    j = 0  # the first trained span not yet passed
    for tid, (a, b) in zip(token_ids, offsets):
        if k < len(images) and b > images[k]:  # a token reaching into the k-th image placeholder
            s, e = images[k], images[k] + width
            if a < s or b > e:
                raise ValueError(f"the image token {image_token!r} is not a token of its own for the tokenizer "
                                 f"(a token spans characters {a}..{b} across it)")
            if a == s:
                ids.extend([image_token_id] * tokens_per_image[k])
                labels.extend([IGNORE] * tokens_per_image[k])
            if b == e:
                k += 1
            continue
        while j < len(spans) and a >= spans[j][1]:
            j += 1
        trained = j < len(spans) and spans[j][0] <= a
        ids.append(tid)
        labels.append(tid if trained else IGNORE)
    if k != len(images):
        raise ValueError(f"the image token {image_token!r} is not a token of its own for the tokenizer")
    return ids, labels


def _encode_pieces(messages, tokenizer, template, image_token, image_token_id, tokens_per_image,
                   add_generation_prompt, video_token=None):
    """Each piece tokenized on its own (tokenizers without offsets): the same ids as the rendered string for
    word-level and byte-level tokenizers, not always for sentencepiece-style ones."""
    ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    k = 0
    marks = (image_token,) + ((video_token,) if video_token else ())
    for text, trained in template.segments(messages, add_generation_prompt, tokenizer, marks):
        for j, part in enumerate(text.split(image_token)):
            if j:
                ids.extend([image_token_id] * tokens_per_image[k])
                labels.extend([IGNORE] * tokens_per_image[k])
                k += 1
            if part:
                piece = _ids(tokenizer, part)
                ids.extend(piece)
                labels.extend(piece if trained else [IGNORE] * len(piece))
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int):
    """Cut to max_length, never through image tokens; a sample left with no trained token is an error."""
    if len(ids) <= max_length:
        return ids, labels
    last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
    if last_image >= max_length:
        raise SampleError(f"{len(ids)} tokens with image tokens up to position {last_image}: "
                          f"too long to keep its image(s) within max_length {max_length}", "too_long_for_images")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        raise SampleError(f"no trained token left after truncation to max_length {max_length}", "no_trained_token")
    return ids, labels
