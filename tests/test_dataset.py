"""Datasets: bad files name the file and the sample; skip mode returns them and collate lists them."""
import json

import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, PATCHES
from vlmkit.data import ConversationDataset, SampleError, collate

QA = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), (220, 40, 40)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    recs = [
        {"id": "good", "image": "img/ok.png", "conversations": QA},
        {"id": "gone", "image": "img/missing.png", "conversations": QA},
        {"id": "broken", "image": "img/corrupt.png", "conversations": QA},
        {"id": "two-images", "image": ["img/ok.png", "img/ok.png"], "conversations": QA},
        {"id": "no-conv", "image": "img/ok.png"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    return tmp_path


def test_good_sample(processor, data_dir):
    ds = ConversationDataset(str(data_dir / "data.json"), processor)
    s = ds[0]
    assert s["id"] == "good"
    assert s["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert int((s["input_ids"] == processor.image_token_id).sum()) == PATCHES
    assert s["input_ids"].shape == s["labels"].shape


@pytest.mark.parametrize("index,sid,needle", [(1, "gone", "missing.png"), (2, "broken", "corrupt.png"),
                                              (3, "two-images", "image"), (4, "no-conv", "conversations")])
def test_bad_sample_error_names_file_and_sample(processor, data_dir, index, sid, needle):
    ds = ConversationDataset(str(data_dir / "data.json"), processor)
    with pytest.raises(SampleError) as ei:
        ds[index]
    msg = str(ei.value)
    assert needle in msg and f"sample {index}" in msg and f"id={sid}" in msg and "data.json" in msg


def test_skip_mode_and_collate(processor, data_dir):
    ds = ConversationDataset(str(data_dir / "data.json"), processor, on_bad_sample="skip")
    items = [ds[i] for i in range(len(ds))]
    assert "skipped" not in items[0]
    skipped = [it["skipped"] for it in items[1:]]
    assert [s["id"] for s in skipped] == ["gone", "broken", "two-images", "no-conv"]
    assert [s["index"] for s in skipped] == [1, 2, 3, 4]
    assert "missing.png" in skipped[0]["reason"] and "corrupt.png" in skipped[1]["reason"]
    batch = collate(items, pad_id=processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 1 and batch["ids"] == ["good"]
    assert [s["id"] for s in batch["skipped"]] == ["gone", "broken", "two-images", "no-conv"]
    assert collate(items[1:3], pad_id=0) == {"skipped": skipped[:2]}


def test_collate_padding(processor):
    img = Image.new("RGB", (8, 8), (0, 0, 255))
    a = processor(QA, [img])
    b = processor([{"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "two shapes"}], [])
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = collate([a, b], pad_id=pad, padding_side=side)
        T = max(len(a["input_ids"]), len(b["input_ids"]))
        n = len(b["input_ids"])
        assert batch["input_ids"].shape == (2, T)
        row = batch["input_ids"][1]
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        assert torch.equal(row[sl], b["input_ids"]) and int(batch["attention_mask"][1].sum()) == n
        assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()
        assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
