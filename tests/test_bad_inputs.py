"""A corpus of bad inputs, each run through check-data and through training's dataset path.

Every case states what should happen: an error of a kind (training raises it naming the file and the sample,
or counts and skips the sample under `on_bad_sample: skip`; check-data reports the same kind), a note (kept for
training, listed by check-data) or ok (a valid variant, e.g. a PNG named .jpg or a file with a BOM). Counted:

    tried        bad (or unusual) inputs run through both paths
    errors       clear errors: training's error names the file (and the sample), check-data says the same kind
    skips        samples counted and left out by training under `skip` (check-data's verdict the same)
    notes        unusual inputs kept and noted by check-data
    crashes      any other exception, in either path (target 0)
    silent       a bad input accepted without an error or a note, or a verdict that differs (target 0)

The figures go to README's "Reliability" section: `python -m pytest -q -s tests/test_bad_inputs.py` prints them
(VLMKIT_CORPUS_REPORT=path.json writes every case's verdict too). The last test trains on the whole corpus with
`skip` (every bad sample counted once, none crashes the run).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import model_config
from test_check_data import bomb_png, exif_image
from vlmkit.training.run import run
from vlmkit.check_data import Target, check_dataset, check_sample
from vlmkit.cli import main
from vlmkit.config import DataConfig, RunConfig, StageConfig, TrainConfig
from vlmkit.data import ConversationDataset, SampleError
from vlmkit.data.dataset import DatasetError

Q = "<image>\nWhat color is the shape?"


def qa(question=Q, answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = qa()
NAN = float("nan")


# ---- image files: (file name, how to write it, expected) -------------------------------------------------
def _save(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _noise(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _gif():
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return b.getvalue()


def _exif_jpeg():
    im, exif = exif_image(6)
    return _save(im.resize((24, 16)), "JPEG", exif=exif, quality=95)


IMAGE_FILES = {
    "ok.png": (lambda: _save(Image.new("RGB", (20, 10), (220, 40, 40)), "PNG"), ("ok",)),
    "truncated.png": (lambda: _save(_noise(32, 32), "PNG")[:300], ("error", "corrupt_image")),
    "truncated.jpg": (lambda: _save(_noise(64, 64, 1), "JPEG")[:400], ("error", "corrupt_image")),
    "zero_bytes.png": (lambda: b"", ("error", "corrupt_image")),
    "notes.png": (lambda: b"meeting notes, not a picture\n", ("error", "corrupt_image")),
    "drawing.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', ("error", "corrupt_image")),
    "png_named.jpg": (lambda: _save(Image.new("RGB", (9, 7), (1, 2, 3)), "PNG"), ("ok",)),  # content decides
    "jpeg_named.png": (lambda: _save(Image.new("RGB", (9, 7), (1, 2, 3)), "JPEG"), ("ok",)),
    "photo.webp": (lambda: _save(Image.new("RGB", (12, 9), (5, 90, 7)), "WEBP"), ("ok",)),
    "bomb_100000x100000.png": (lambda: bomb_png(100_000, 100_000), ("error", "image_too_large")),
    "thin_1x30000.png": (lambda: bomb_png(1, 30_000), ("error", "extreme_aspect_ratio")),
    "thin_100000x1.png": (lambda: bomb_png(100_000, 1), ("error", "extreme_aspect_ratio")),
    "tall_200x30000.png": (lambda: bomb_png(200, 30_000), ("error", "image_too_large")),  # pad canvas 30000^2
    "zero_width.png": (lambda: bomb_png(0, 10), ("error", "corrupt_image")),
    "cmyk.jpg": (lambda: _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), ("note", "mode_CMYK")),
    "sixteen_bit.png": (lambda: _save(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"), ("note", "mode_I;16")),
    "animated.gif": (_gif, ("note", "animated")),
    "rgba.png": (lambda: _save(Image.new("RGBA", (6, 6), (0, 0, 0, 0)), "PNG"), ("note", "mode_RGBA")),
    "exif_rotated.jpg": (_exif_jpeg, ("note", "exif_rotation")),
    "wide_300x15.png": (lambda: _save(Image.new("RGB", (300, 15), (9, 9, 9)), "PNG"), ("note", "extreme_aspect")),
}

# ---- samples: (id, image entry or None, conversations (or a whole record via RAW), expected) ---------------
RAW = object()
SAMPLES = [
    ("missing-file", "missing.png", GOOD, ("error", "missing_image")),
    ("directory", "a_dir.png", GOOD, ("error", "missing_image")),
    ("dotdot-escape", "../outside.png", GOOD, ("error", "image_outside_folder")),
    ("absolute-path", "ABSOLUTE", GOOD, ("error", "image_outside_folder")),
    ("symlink-escape", "link_out.png", GOOD, ("error", "image_outside_folder")),
    ("symlink-inside", "link_in.png", GOOD, ("ok",)),
    ("conversations-string", "ok.png", "What color? red", ("error", "invalid_sample")),
    ("conversations-dict", "ok.png", {"from": "human", "value": Q}, ("error", "invalid_sample")),
    ("conversations-empty", "ok.png", [], ("error", "invalid_sample")),
    ("turn-is-string", "ok.png", [Q, {"from": "gpt", "value": "red"}], ("error", "invalid_sample")),
    ("turns-are-lists", "ok.png", [["human", Q], ["gpt", "red"]], ("error", "invalid_sample")),
    ("unknown-role", "ok.png", [{"from": "robot", "value": Q}, {"from": "gpt", "value": "red"}],
     ("error", "invalid_sample")),
    ("value-number", "ok.png", qa(answer=2), ("error", "invalid_sample")),
    ("value-null", "ok.png", qa(answer=None), ("error", "invalid_sample")),
    ("value-nan", "ok.png", qa(answer=NAN), ("error", "invalid_sample")),
    ("value-nested", "ok.png", qa(answer={"text": "red"}), ("error", "invalid_sample")),
    ("image-number", 123, GOOD, ("error", "invalid_sample")),
    ("image-nan", NAN, GOOD, ("error", "invalid_sample")),
    ("image-empty-string", "", GOOD, ("error", "invalid_sample")),
    ("image-nested-list", [["ok.png"]], GOOD, ("error", "invalid_sample")),
    ("image-dict-without-path", {"file": "ok.png"}, GOOD, ("error", "invalid_sample")),
    ("record-list", RAW, ["ok.png", GOOD], ("error", "invalid_sample")),
    ("record-string", RAW, "ok.png", ("error", "invalid_sample")),
    ("record-null", RAW, None, ("error", "invalid_sample")),
    ("no-conversations", "ok.png", None, ("error", "invalid_sample")),
    ("id-nan", RAW, {"id": NAN, "image": "ok.png", "conversations": GOOD}, ("error", "invalid_sample")),
    ("id-dict", RAW, {"id": {"a": 1}, "image": "ok.png", "conversations": GOOD}, ("error", "invalid_sample")),
    ("two-human-turns", "ok.png", [{"from": "human", "value": Q}, {"from": "human", "value": "Again?"},
                                   {"from": "gpt", "value": "red"}], ("error", "turn_order")),
    ("assistant-first", "ok.png", [{"from": "gpt", "value": "Hello."}] + GOOD, ("error", "turn_order")),
    ("two-answers", "ok.png", GOOD + [{"from": "gpt", "value": "blue"}], ("error", "turn_order")),
    ("late-system", "ok.png", GOOD + [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Why?"},
                                      {"from": "gpt", "value": "red"}], ("error", "turn_order")),
    ("empty-answer", "ok.png", qa(answer=""), ("error", "empty_answer")),
    ("blank-answer", "ok.png", qa(answer="   \n"), ("error", "empty_answer")),
    ("two-placeholders", "ok.png", qa("<image> <image>\nWhat color?"), ("error", "image_count_mismatch")),
    ("no-placeholder", "ok.png", qa("What color is the shape?"), ("error", "image_count_mismatch")),
    ("placeholder-no-image", None, GOOD, ("error", "image_count_mismatch")),
    ("image-in-answer", "ok.png", qa(answer="<image> red"), ("error", "image_in_assistant_turn")),
    ("question-only", "ok.png", GOOD[:1], ("error", "no_assistant_turn")),
    ("long-before-image", "ok.png", qa("one two three four " * 6 + Q), ("error", "too_long_for_images")),
    ("answer-cut-away", "ok.png", qa(Q + " one two three four" * 6), ("error", "no_trained_token")),
    ("missing-and-miscounted", "missing.png", qa("What color is the shape?"), ("error", "missing_image")),
    ("text-only", None, qa("What color is the shape?"), ("ok",)),
    ("system-first", "ok.png", [{"from": "system", "value": "Be brief."}] + GOOD, ("ok",)),
    ("role-content-style", "ok.png", [{"role": "user", "content": Q}, {"role": "assistant", "content": "red"}],
     ("ok",)),
    ("unicode", "ok.png", qa(answer="red \u2764\ufe0f \u00e9\u00e8 \u4e2d"), ("ok",)),
    ("unanswered-last-turn", "ok.png", GOOD + [{"from": "human", "value": "And the size?"}],
     ("note", "unanswered_last_turn")),
    ("dup", "ok.png", GOOD, ("ok",)),
    ("dup", "ok.png", GOOD, ("note", "duplicate_id")),
] + [(f"file-{name}", name, GOOD, expected) for name, (_, expected) in IMAGE_FILES.items()]


# ---- dataset files: (file name, bytes, expected) ------------------------------------------------------------
def _records_text(recs) -> str:
    return json.dumps(recs, ensure_ascii=False)


ONE = [{"id": "a", "image": "ok.png", "conversations": GOOD}]
DATASET_FILES = [
    ("latin1.json", _records_text([{"id": "caf\u00e9", "image": "ok.png", "conversations": GOOD}]).encode("latin-1"),
     ("error", "unreadable_dataset")),
    ("utf16.json", _records_text(ONE).encode("utf-16"), ("error", "unreadable_dataset")),
    ("bom.json", b"\xef\xbb\xbf" + _records_text(ONE).encode(), ("ok",)),
    ("bom.jsonl", b"\xef\xbb\xbf" + json.dumps(ONE[0]).encode() + b"\n", ("ok",)),
    ("syntax.json", b'[{"id": "a", "conversations": [}]', ("error", "unreadable_dataset")),
    ("trailing-comma.json", b'[{"id": "a", "image": "ok.png", "conversations": []},]', ("error", "unreadable_dataset")),
    ("bad-line-5.jsonl", ("\n".join([json.dumps(ONE[0]), "", json.dumps(ONE[0]), "", '{"id": "b", oops}'])
                          + "\n").encode(), ("error", "unreadable_dataset")),
    ("crlf-blank-lines.jsonl", ("\r\n".join([json.dumps(ONE[0]), "", json.dumps(ONE[0])]) + "\r\n").encode(), ("ok",)),
    ("object-not-list.json", json.dumps({"data": ONE}).encode(), ("error", "unreadable_dataset")),
    ("empty-list.json", b"[]", ("error", "empty_dataset")),
    ("zero-bytes.json", b"", ("error", "unreadable_dataset")),
    ("blank-lines-only.jsonl", b"\n\n  \n", ("error", "empty_dataset")),
    ("jsonl-named.json", ("\n".join(json.dumps(r) for r in ONE * 2) + "\n").encode(), ("error", "unreadable_dataset")),
    ("nan-literal.json", b'[{"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": NaN}]}]',
     ("ok-file",)),  # the file parses; its sample is the error (value-nan above)
    ("absent.json", None, ("error", "unreadable_dataset")),
    ("a-folder", "DIR", ("error", "unreadable_dataset")),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    imgs = root / "imgs"
    imgs.mkdir()
    for name, (write, _) in IMAGE_FILES.items():
        (imgs / name).write_bytes(write())
    (imgs / "a_dir.png").mkdir()
    Image.new("RGB", (8, 8)).save(root / "outside.png")
    os.symlink(root / "outside.png", imgs / "link_out.png")
    os.symlink(imgs / "ok.png", imgs / "link_in.png")
    recs = []
    for sid, img, conv, _ in SAMPLES:
        if img is RAW:
            recs.append(conv)
            continue
        r = {"id": sid}
        if img is not None:
            r["image"] = str(root / "outside.png") if img == "ABSOLUTE" else img
        if conv is not None:
            r["conversations"] = conv
        recs.append(r)
    (root / "samples.json").write_text(json.dumps(recs))  # NaN written as the NaN literal, as Python's json does
    files = root / "files"
    files.mkdir()
    for name, data, _ in DATASET_FILES:
        if data == "DIR":
            (files / name).mkdir()
        elif data is not None:
            (files / name).write_bytes(data)
    for n in ("ok.png",):
        (files / n).write_bytes((imgs / n).read_bytes())
    return root


@pytest.fixture(scope="module")
def max_length(processor):
    n = len(processor(GOOD, [Image.new("RGB", (8, 8))])["input_ids"])
    return n + 4


def _verdict(processor, corpus, max_length):
    """Every case through both paths; returns (rows, figures)."""
    data = str(corpus / "samples.json")
    folder = str(corpus / "imgs")
    kw = dict(image_folder=folder, max_length=max_length)
    skip = ConversationDataset(data, processor, on_bad_sample="skip", **kw)
    strict = ConversationDataset(data, processor, **kw)
    report = check_dataset(Target(data, processor, image_folder=folder, max_length=max_length), progress=False)
    dup_notes = [f["index"] for f in report["notes"].get("duplicate_id", {}).get("first", [])]
    rows = []
    for i, (sid, _, _, expected) in enumerate(SAMPLES):
        row = {"case": sid if not sid.startswith("file-") else sid[5:], "expected": list(expected), "crash": None}
        try:
            cd = check_sample(skip, i)
            row["check_data"] = [k for k, _ in cd["errors"]] or None
            row["notes"] = [k for k, _ in cd["notes"]] + (["duplicate_id"] if i in dup_notes else [])
        except Exception as e:  # noqa: BLE001 - counted
            row["crash"] = f"check-data: {type(e).__name__}: {e}"
        try:
            out = skip[i]
            row["train_skip"] = out["skipped"]["kind"] if "skipped" in out else None
        except Exception as e:  # noqa: BLE001
            row["crash"] = f"training (skip): {type(e).__name__}: {e}"
        try:
            strict[i]
            row["train_error"] = None
        except SampleError as e:
            named = data in str(e) and f"sample {i} " in str(e)
            row["train_error"] = e.kind if named else f"unnamed: {e}"
        except Exception as e:  # noqa: BLE001
            row["crash"] = f"training (error): {type(e).__name__}: {e}"
        rows.append(row)
    for name, _, expected in DATASET_FILES:
        path = str(corpus / "files" / name)
        row = {"case": f"dataset file {name}", "expected": list(expected), "crash": None, "notes": []}
        try:
            r = check_dataset(Target(path, processor), progress=False)
            row["check_data"] = sorted(r["errors"]) or None
            if expected[0] == "ok-file":  # the file is fine; its one sample carries the error
                row["check_data"] = None if set(r["errors"]) == {"invalid_sample"} else sorted(r["errors"])
        except Exception as e:  # noqa: BLE001
            row["crash"] = f"check-data: {type(e).__name__}: {e}"
        try:
            ConversationDataset(path, processor)
            row["train_error"] = None
        except (DatasetError, FileNotFoundError) as e:
            row["train_error"] = (getattr(e, "kind", "unreadable_dataset") if name in str(e)
                                  else f"unnamed: {e}")
        except Exception as e:  # noqa: BLE001
            row["crash"] = f"training: {type(e).__name__}: {e}"
        row["train_skip"] = row["train_error"]  # a whole file: the same in both modes
        rows.append(row)
    figures = {"tried": len(rows), "errors": 0, "skips": 0, "notes": 0, "ok": 0, "crashes": 0, "silent": 0}
    for row in rows:
        kind = row["expected"]
        if row["crash"]:
            figures["crashes"] += 1
            continue
        got = (row.get("check_data"), row.get("train_skip"), row.get("train_error"))
        if kind[0] == "error":
            good = got[0] is not None and got[0][0] == kind[1] and got[1] == kind[1] and got[2] == kind[1]
            if good:
                figures["errors"] += 1
                figures["skips"] += not row["case"].startswith("dataset file")
            else:
                figures["silent"] += 1
                row["problem"] = f"expected {kind[1]} everywhere, got check-data {got[0]}, skip {got[1]}, error {got[2]}"
        else:
            clean = got == (None, None, None)
            if kind[0] == "note" and not (clean and kind[1] in row["notes"]):
                figures["silent"] += 1
                row["problem"] = f"expected the note {kind[1]}, got {got} notes {row['notes']}"
            elif kind[0] != "note" and not clean:
                figures["silent"] += 1  # a valid variant refused: counted with the wrong verdicts
                row["problem"] = f"expected it accepted, got {got}"
            else:
                figures["notes" if kind[0] == "note" else "ok"] += 1
    return rows, figures


def test_every_bad_input_gets_a_clear_verdict(processor, corpus, max_length):
    rows, figures = _verdict(processor, corpus, max_length)
    if os.environ.get("VLMKIT_CORPUS_REPORT"):
        Path(os.environ["VLMKIT_CORPUS_REPORT"]).write_text(json.dumps({"figures": figures, "cases": rows}, indent=1))
    print(f"\nbad-input corpus: {figures['tried']} inputs tried: {figures['errors']} clear errors (of which "
          f"{figures['skips']} counted skips under on_bad_sample: skip), {figures['notes']} accepted with a note, "
          f"{figures['ok']} valid variants accepted, {figures['crashes']} crashes, {figures['silent']} silent "
          f"acceptances or mismatched verdicts")
    problems = [(r["case"], r.get("crash") or r.get("problem")) for r in rows if r.get("crash") or r.get("problem")]
    assert not problems, problems
    assert figures["crashes"] == 0 and figures["silent"] == 0
    assert figures["tried"] >= 80


def test_check_data_command_on_the_corpus(corpus, max_length, vlm, tmp_path, capsys):
    """The command itself: exit status 1, a table of kinds, no traceback."""
    vlm.save_pretrained(tmp_path / "model")
    rc = main(["check-data", str(corpus / "samples.json"), "--model", str(tmp_path / "model"), "--image-folder",
               str(corpus / "imgs"), "--max-length", str(max_length), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    for kind in ("image_outside_folder", "extreme_aspect_ratio", "turn_order", "empty_answer", "invalid_sample"):
        assert kind in out
    for note in ("duplicate_id", "extreme_aspect", "unanswered_last_turn", "animated"):
        assert note in out


def test_training_on_the_whole_corpus_skips_each_bad_sample_once(encoder_dirs, llm_dir, corpus, max_length, tmp_path):
    """A real run with on_bad_sample: skip over every sample of the corpus, for 3 epochs: it finishes, and each
    bad sample is listed once (not once per epoch) with check-data's kind."""
    bad = {i: e[1] for i, (_, _, _, e) in enumerate(SAMPLES) if e[0] == "error"}
    n_good = len(SAMPLES) - len(bad)
    st = StageConfig(name="s", train={"connector": "full"},
                     data=DataConfig(path=str(corpus / "samples.json"), image_folder=str(corpus / "imgs"),
                                     max_length=max_length, num_workers=0, on_bad_sample="skip"),
                     lr=1e-3, epochs=3, global_batch_size=16, per_device_batch_size=16, warmup_ratio=0.0)
    cfg = RunConfig(model=model_config(encoder_dirs["clip"], llm_dir), stages=[st],
                    train=TrainConfig(output_dir=str(tmp_path / "run"), log_with=None, log_every=1))
    _, _, metrics = run(cfg, cpu=True)
    skipped = metrics[0]["skipped"]
    assert sorted(s["index"] for s in skipped) == sorted(bad)  # each once, over 3 epochs
    assert {s["index"]: s["kind"] for s in skipped} == bad
    assert metrics[0]["samples"] >= 3 * n_good
