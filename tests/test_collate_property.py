"""Property tests for collation on arbitrary batches: padded (right / left) and packed."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmkit.data import collate
from vlmkit.data.processor import collate_packed

PAD = 0


@st.composite
def samples(draw):
    """1-6 samples: lengths 1-40, labels -100 or the id, 0-2 images each (distinct pixel values)."""
    out = []
    for k in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 40))
        ids = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
        trained = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        n_img = draw(st.integers(0, 2))
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor([t if m else -100 for t, m in zip(ids, trained)]),
                    "pixel_values": torch.full((n_img, 3, 2, 2), float(k)), "id": f"s{k}"})
    if draw(st.booleans()):  # a skipped sample somewhere
        out.insert(draw(st.integers(0, len(out))), {"skipped": {"index": 99, "id": "bad", "reason": "x"}})
    return out


def real(ss):
    return [s for s in ss if "skipped" not in s]


@settings(max_examples=150, deadline=None, database=None)
@given(samples(), st.sampled_from(["right", "left"]))
def test_padded_collate_keeps_every_sample_intact(ss, side):
    b = collate(ss, PAD, padding_side=side)
    kept = real(ss)
    assert b["ids"] == [s["id"] for s in kept] and [x["id"] for x in b["skipped"]] == ["bad"] * (len(ss) - len(kept))
    assert b["input_ids"].shape == (len(kept), max(len(s["input_ids"]) for s in kept))
    for r, s in enumerate(kept):
        m = b["attention_mask"][r].bool()
        assert int(m.sum()) == len(s["input_ids"])
        assert torch.equal(b["input_ids"][r][m], s["input_ids"]) and torch.equal(b["labels"][r][m], s["labels"])
        assert (b["input_ids"][r][~m] == PAD).all() and (b["labels"][r][~m] == -100).all()
        idx = m.nonzero().flatten()  # the real tokens are contiguous, at the chosen side
        assert idx.numel() == 0 or int(idx[-1] - idx[0]) + 1 == idx.numel()
        assert side == "left" and m[-1] or side == "right" and m[0]
    assert torch.equal(b["pixel_values"], torch.cat([s["pixel_values"] for s in kept]))


@settings(max_examples=150, deadline=None, database=None)
@given(samples(), st.sampled_from([0, 40, 64]))
def test_packed_collate_keeps_every_sample_intact(ss, max_tokens):
    b = collate_packed(ss, PAD, max_tokens=max_tokens)
    kept = real(ss)
    flat_ids, flat_labels = b["input_ids"].flatten(), b["labels"].flatten()
    flat_pos, flat_mask = b["position_ids"].flatten(), b["attention_mask"].flatten()
    cu = b["cu_seqlens"].tolist()
    assert len(cu) == len(kept) + 1 and cu[0] == 0 and cu == sorted(cu)
    assert b["ids"] == [s["id"] for s in kept]
    for i, s in enumerate(kept):  # sample i occupies [cu[i], cu[i] + n): its ids, labels but the first, positions 0..
        n, a = len(s["input_ids"]), cu[i]
        assert cu[i + 1] - a >= n
        assert torch.equal(flat_ids[a:a + n], s["input_ids"])
        assert flat_labels[a] == -100 and torch.equal(flat_labels[a + 1:a + n], s["labels"][1:])
        assert torch.equal(flat_pos[a:cu[i + 1]], torch.arange(cu[i + 1] - a))
        assert flat_mask[a:a + n].all() and not flat_mask[a + n:cu[i + 1]].any()
        assert (flat_labels[a + n:cu[i + 1]] == -100).all()
    assert cu[-1] <= flat_ids.numel() and int(flat_mask.sum()) == sum(len(s["input_ids"]) for s in kept)
    if max_tokens:  # rows hold at most max_tokens real tokens unless one sample alone is longer
        for r in range(b["input_ids"].shape[0]):
            assert int(b["attention_mask"][r].sum()) <= max(max_tokens, max(len(s["input_ids"]) for s in kept))
    assert torch.equal(b["pixel_values"], torch.cat([s["pixel_values"] for s in kept]))


def test_collate_in_a_worker_gives_the_same_batches():
    """In a data-loader worker the tiles are concatenated straight into shared memory (`cat_pixels`): the batches
    the training process receives equal in-process collation, padded and packed, with and without images."""
    from functools import partial

    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.arange(1, 3 + k), "labels": torch.arange(1, 3 + k),
             "pixel_values": torch.randn(k % 3, 3, 4, 4, generator=g), "id": k} for k in range(8)]
    for pack in (False, True):
        fn = partial(collate, pad_id=PAD, pack=pack)
        got = list(DataLoader(data, batch_size=3, num_workers=1, collate_fn=fn))
        want = [fn(data[i:i + 3]) for i in range(0, 8, 3)]
        assert len(got) == len(want) == 3
        for b, w in zip(got, want):
            assert b.keys() == w.keys()
            for key in w:
                if torch.is_tensor(w[key]):
                    assert b[key].dtype == w[key].dtype and torch.equal(b[key], w[key]), (pack, key)
                else:
                    assert b[key] == w[key], (pack, key)
    assert [tuple(b["pixel_values"].shape) for b in got] == [(3, 3, 4, 4), (3, 3, 4, 4), (1, 3, 4, 4)]
