"""Bad data (issue 16, items 2-9): images bounded from their header (thin images, the pad canvas), image paths
confined to the image folder, wrong-shaped samples counted never crashing, parse errors naming the file and line,
empty datasets, notes that say what training does, evaluation errors naming the sample, the bomb message quoting
vlmkit's own limit. The wide corpus of bad inputs is tests/test_bad_inputs.py."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from test_check_data import bomb_png
from test_resume import small_run
from vlmkit.training.batches import make_dataset
from vlmkit.training.run import run
from vlmkit.check_data import Target, check_dataset
from vlmkit.cli import main
from vlmkit.config import ConfigError, DataConfig
from vlmkit.data import ConversationDataset, SampleError
from vlmkit.data.dataset import DatasetError
from vlmkit.evaluate import evaluate

Q = "<image>\nWhat color is the shape?"
GOOD = [{"from": "human", "value": Q}, {"from": "gpt", "value": "red"}]


def write_json(path: Path, recs) -> str:
    path.write_text(json.dumps(recs))
    return str(path)


# ---- 2. thin images, 9. the bomb message -----------------------------------------------------------------------
def test_thin_images_are_refused_from_the_header_before_any_large_buffer(processor, tmp_path, monkeypatch):
    """A 1 x 30000 PNG (too thin) and a 150 x 30000 one (pad mode's square canvas: 30000^2 pixels) are refused
    before decoding and counted as bad samples; nothing allocates a buffer larger than the pixel limit. In resize
    mode the 150 x 30000 image needs no canvas and is kept."""
    Image.new("RGB", (1, 30000), (200, 10, 10)).save(tmp_path / "thin.png")
    Image.new("RGB", (150, 30000), (200, 10, 10)).save(tmp_path / "tall.png")
    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "ok.png")
    data = write_json(tmp_path / "d.json", [{"id": n, "image": f"{n}.png", "conversations": GOOD}
                                            for n in ("thin", "tall", "ok")])
    real_new, big = Image.new, []

    def guarded_new(mode, size, *a, **k):
        if size[0] * size[1] > 20_000_000:  # ~the 150 x 30000 image itself is 4.5M
            big.append(size)
            raise MemoryError(f"test: a {size} buffer")
        return real_new(mode, size, *a, **k)

    monkeypatch.setattr(Image, "new", guarded_new)
    ds = ConversationDataset(data, processor, on_bad_sample="skip", max_image_pixels=20_000_000)
    thin, tall, ok = ds[0], ds[1], ds[2]
    assert thin["skipped"]["kind"] == "extreme_aspect_ratio" and "1x30000" in thin["skipped"]["reason"]
    assert tall["skipped"]["kind"] == "image_too_large" and "30000x30000" in tall["skipped"]["reason"]
    assert "pixel_values" in ok and big == []
    r = check_dataset(Target(data, processor, max_image_pixels=20_000_000), progress=False)
    assert {k: v["count"] for k, v in r["errors"].items()} == {"extreme_aspect_ratio": 1, "image_too_large": 1}
    resize = dataclasses.replace(processor, transform=dataclasses.replace(processor.transform, aspect="resize"))
    assert "pixel_values" in ConversationDataset(data, resize, max_image_pixels=20_000_000)[1] and big == []
    # the aspect limit is a setting: without it, the pad canvas still bounds the 1 x 30000 image
    loose = ConversationDataset(data, processor, on_bad_sample="skip", max_aspect_ratio=0, max_image_pixels=20_000_000)
    assert loose[0]["skipped"]["kind"] == "image_too_large" and big == []
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        DataConfig(path="x.json", max_aspect_ratio="wide")


def test_bomb_message_quotes_vlmkits_configured_limit(processor, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    data = write_json(tmp_path / "d.json", [{"id": "b", "image": "bomb.png", "conversations": GOOD}])
    with pytest.raises(SampleError) as ei:
        ConversationDataset(data, processor, max_image_pixels=5_000_000)[0]
    assert "over the limit of 5,000,000" in str(ei.value) and "357" not in str(ei.value)
    assert ei.value.kind == "image_too_large"


# ---- 3. image paths stay inside the image folder -----------------------------------------------------------------
def test_image_paths_are_confined_to_the_image_folder(processor, tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(imgs / "ok.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", imgs / "link_out.png")
    os.symlink(imgs / "ok.png", imgs / "sub" / "link_in.png")
    cases = {"dotdot": "../secret.png", "absolute": str(tmp_path / "secret.png"), "symlink_out": "link_out.png",
             "inside": "sub/../ok.png", "symlink_in": "sub/link_in.png", "dict_dotdot": {"path": "../secret.png"}}
    data = write_json(tmp_path / "d.json", [{"id": k, "image": v, "conversations": GOOD} for k, v in cases.items()])
    ds = ConversationDataset(data, processor, image_folder=str(imgs), on_bad_sample="skip")
    kinds = {k: ds[i].get("skipped", {}).get("kind") for i, k in enumerate(cases)}
    assert kinds == {"dotdot": "image_outside_folder", "absolute": "image_outside_folder",
                     "symlink_out": "image_outside_folder", "inside": None, "symlink_in": None,
                     "dict_dotdot": "image_outside_folder"}
    assert "'..' climbs out" in ds[0]["skipped"]["reason"] and "a symlink to" in ds[2]["skipped"]["reason"]
    r = check_dataset(Target(data, processor, image_folder=str(imgs)), progress=False)
    assert r["errors"]["image_outside_folder"]["count"] == 4
    # the explicit option: any path is opened
    free = ConversationDataset(data, processor, image_folder=str(imgs), allow_absolute_image_paths=True)
    assert all("pixel_values" in free[i] for i in range(len(cases)))
    assert check_dataset(Target(data, processor, image_folder=str(imgs), allow_absolute_image_paths=True),
                         progress=False)["errors"] == {}


# ---- 4. wrong shapes, 5. parse errors, 6. empty datasets ------------------------------------------------------
def test_wrong_shapes_never_crash_and_get_the_same_verdict_everywhere(processor, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    recs = [{"id": "turn-str", "image": "ok.png", "conversations": [Q, {"from": "gpt", "value": "red"}]},
            {"id": "conv-str", "image": "ok.png", "conversations": "hello"},
            {"id": "image-int", "image": 123, "conversations": GOOD},
            {"id": "ok", "image": "ok.png", "conversations": GOOD}]
    data = write_json(tmp_path / "d.json", recs)
    skip = ConversationDataset(data, processor, on_bad_sample="skip")
    strict = ConversationDataset(data, processor)
    report = check_dataset(Target(data, processor), progress=False)
    assert report["errors"]["invalid_sample"]["count"] == 3
    for i in range(3):
        assert skip[i]["skipped"]["kind"] == "invalid_sample"
        with pytest.raises(SampleError, match=rf"d\.json: sample {i} \(id={recs[i]['id']}\)"):
            strict[i]
    assert "pixel_values" in skip[3]


def test_parse_errors_name_the_file_and_the_line(processor, tmp_path):
    good = json.dumps({"id": "a", "conversations": GOOD})
    (tmp_path / "d.jsonl").write_text("\n".join([good, "", good, "", '{"id": "b", oops}', good]) + "\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl: invalid JSON at line 5, column"):
        make_dataset(DataConfig(path=str(tmp_path / "d.jsonl")), processor)
    (tmp_path / "latin.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(DatasetError, match=r"latin\.json: not UTF-8 text: byte 0xe9 at line 1, column 13"):
        make_dataset(DataConfig(path=str(tmp_path / "latin.json")), processor)
    (tmp_path / "lines.json").write_text(good + "\n" + good + "\n")
    with pytest.raises(DatasetError, match=r"lines\.json: invalid JSON at line 2.*name the file \.jsonl"):
        make_dataset(DataConfig(path=str(tmp_path / "lines.json")), processor)


def test_an_empty_dataset_is_a_clear_error_in_check_data_and_training(encoder_dirs, llm_dir, vlm, tmp_path, capsys):
    data = write_json(tmp_path / "empty.json", [])
    vlm.save_pretrained(tmp_path / "model")
    assert main(["check-data", data, "--model", str(tmp_path / "model"), "--no-progress"]) == 1
    assert "empty_dataset" in capsys.readouterr().out
    cfg = small_run(encoder_dirs, llm_dir, data, tmp_path / "run")
    with pytest.raises(DatasetError, match=r"empty\.json: the dataset holds no samples"):
        run(cfg, cpu=True)


# ---- 8. notes that say what training does ----------------------------------------------------------------------
def test_notes_say_what_training_does(processor, tmp_path):
    Image.new("RGB", (300, 12), (5, 5, 5)).save(tmp_path / "wide.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    recs = [{"id": "wide", "image": "wide.png", "conversations": GOOD},
            {"id": "a", "image": "ok.png", "conversations": GOOD},
            {"id": "a", "image": "ok.png", "conversations": GOOD},
            {"id": "two-users", "image": "ok.png", "conversations": [GOOD[0], {"from": "human", "value": "?"}, GOOD[1]]},
            {"id": "gpt-first", "image": "ok.png", "conversations": [GOOD[1]] + GOOD},
            {"id": "empty", "image": "ok.png", "conversations": [GOOD[0], {"from": "gpt", "value": ""}]}]
    data = write_json(tmp_path / "d.json", recs)
    r = check_dataset(Target(data, processor), progress=False)
    wide = r["notes"]["extreme_aspect"]["first"][0]["message"]
    assert "300x12" in wide and "padded to a square" in wide and "fills 4.0%" in wide
    assert r["notes"]["duplicate_id"]["first"][0]["index"] == 2
    assert {k: v["count"] for k, v in r["errors"].items()} == {"turn_order": 2, "empty_answer": 1}
    skip = ConversationDataset(data, processor, on_bad_sample="skip")
    assert [skip[i].get("skipped", {}).get("kind") for i in range(6)] == [None, None, None, "turn_order",
                                                                           "turn_order", "empty_answer"]


# ---- 9. evaluation errors name the file and the sample -----------------------------------------------------------
def test_eval_errors_name_the_data_file_and_the_sample(vlm, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    for recs, what in (([{"id": "q0", "image": "ok.png", "conversations": GOOD},
                         {"id": "q1", "image": "gone.png", "conversations": GOOD}], "image not found"),
                       ([{"id": "q0", "image": "ok.png", "conversations": GOOD},
                         {"id": "q1", "image": "ok.png", "conversations": [Q, "red"]}], "turn 0")):
        data = write_json(tmp_path / "eval.json", recs)
        with pytest.raises(SampleError, match=rf"eval\.json: sample 1 \(id=q1\): .*{what}"):
            evaluate(vlm, data, progress=False)
