"""HF `datasets` input: the same LLaVA fields, images as an Image feature or as relative paths."""
from __future__ import annotations

import json

import datasets
import torch
from PIL import Image

from vlmkit.data.dataset import ConversationDataset


def _samples(tmp_path):
    (tmp_path / "imgs").mkdir()
    recs = []
    for i in range(3):
        Image.new("RGB", (20 + i, 12), (80 * i, 10, 200)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": f"s{i}", "image": f"imgs/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]})
    return recs


def test_hf_dataset_with_image_feature_equals_json(tmp_path, processor):
    recs = _samples(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(recs))
    from_json = ConversationDataset(str(tmp_path / "data.json"), processor)

    ds = datasets.Dataset.from_list([dict(r, image=str(tmp_path / r["image"])) for r in recs])
    ds = ds.cast_column("image", datasets.Image())  # decoded to PIL images on access
    ds.save_to_disk(str(tmp_path / "hf"))
    from_hf = ConversationDataset(str(tmp_path / "hf"), processor)

    assert len(from_hf) == len(from_json) == 3
    for i in range(3):
        a, b = from_json[i], from_hf[i]
        assert a["id"] == b["id"] == f"s{i}"
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_hf_dataset_with_relative_paths(tmp_path, processor):
    recs = _samples(tmp_path)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf_paths"))
    ds = ConversationDataset(str(tmp_path / "hf_paths"), processor, image_folder=str(tmp_path))
    out = ds[2]
    assert out["pixel_values"].shape[0] == 1 and out["id"] == "s2"
