"""`vlmkit check-data` over a corpus of bad files and bad samples built here; the training path
(load_image, ConversationDataset) gives the right RGB pixels for unusual images and refuses bombs."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import IMAGE_SIZE, PATCHES, model_config
from vlmkit.check_data import check_dataset, check_sample, Target
from vlmkit.cli import main
from vlmkit.data import ConversationDataset, SampleError
from vlmkit.data.images import ImageError, load_image
from vlmkit.model import build_processor, load_processor

Q = "<image>\nWhat color is the shape?"


def qa(question=Q, answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ---- files ----------------------------------------------------------------------------------------
def png_bytes(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels (decoding it would need ~30 GB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


def exif_image(orientation: int):
    """3x2 (w x h) image: the stored top-left pixel red, top-right green, the rest blue."""
    a = np.zeros((2, 3, 3), np.uint8)
    a[:] = (0, 0, 255)
    a[0, 0] = (255, 0, 0)
    a[0, 2] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return Image.fromarray(a), exif


def write_files(d):
    ok = Image.new("RGB", (20, 10), (220, 40, 40))
    ok.save(d / "ok.png")
    full = png_bytes(Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)))
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    b = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(b, "JPEG")
    (d / "truncated.jpg").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    (d / "notes.txt.png").write_bytes(b"these are meeting notes, not a picture\n")
    (d / "bomb.png").write_bytes(bomb_png())
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(d / "cmyk.tif")
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(d / "rgba.png")
    Image.new("LA", (4, 4), (90, 255)).save(d / "la.png")
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(d / "p.png", transparency=1)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(d / "i16.png")
    Image.new("L", (4, 4), 77).save(d / "l.png")
    Image.new("1", (4, 4), 1).save(d / "one.png")
    im, exif = exif_image(6)
    im.save(d / "exif6.png", exif=exif)


GOOD = qa()
SAMPLES = [
    # (id, image(s), conversations, expected error kinds or notes)
    ("good", "ok.png", GOOD),
    ("gone", "missing.png", GOOD),
    ("trunc-png", "truncated.png", GOOD),
    ("trunc-jpg", "truncated.jpg", GOOD),
    ("not-image", "notes.txt.png", GOOD),
    ("bomb", "bomb.png", GOOD),
    ("cmyk", "cmyk.tif", GOOD),
    ("rgba", "rgba.png", GOOD),
    ("la", "la.png", GOOD),
    ("palette", "p.png", GOOD),
    ("16bit", "i16.png", GOOD),
    ("grey", "l.png", GOOD),
    ("1bit", "one.png", GOOD),
    ("exif", "exif6.png", GOOD),
    ("two-placeholders", "ok.png", qa("<image> and <image>\nWhat color is the shape?")),
    ("no-placeholder", "ok.png", qa("What color is the shape?")),
    ("extra-image", ["ok.png", "ok.png"], GOOD),
    ("no-answer", "ok.png", qa()[:1]),
    ("image-in-answer", "ok.png", qa(answer="<image> red")),
    ("long-question", "ok.png", qa(Q + " one two three four" * 6)),  # answer cut away
    ("long-before-image", "ok.png", qa("one two three four " * 6 + Q)),  # image tokens cut
    ("missing-and-miscounted", "missing.png", qa("What color is the shape?")),
    ("no-conversations", "ok.png", None),
    ("bad-role", None, [{"from": "robot", "value": "hi"}]),
]
ERRORS = {
    "gone": ["missing_image"], "trunc-png": ["corrupt_image"], "trunc-jpg": ["corrupt_image"],
    "not-image": ["corrupt_image"], "bomb": ["image_too_large"], "two-placeholders": ["image_count_mismatch"],
    "no-placeholder": ["image_count_mismatch"], "extra-image": ["image_count_mismatch"],
    "no-answer": ["no_assistant_turn"], "image-in-answer": ["image_in_assistant_turn"],
    "long-question": ["no_trained_token"], "long-before-image": ["too_long_for_images"],
    "missing-and-miscounted": ["missing_image", "image_count_mismatch"],
    "no-conversations": ["invalid_sample"], "bad-role": ["invalid_sample"],
}
NOTES = {"cmyk": "mode_CMYK", "rgba": "mode_RGBA", "la": "mode_LA", "palette": "mode_P", "16bit": "mode_I;16",
         "grey": "mode_L", "1bit": "mode_1", "exif": "exif_rotation"}


@pytest.fixture(scope="module")
def max_length(processor):
    """Room for the good sample and a little more; the long samples go past it."""
    n = len(processor(GOOD, [Image.new("RGB", (8, 8))])["input_ids"])
    return n + 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_files(d)
    recs = []
    for sid, img, conv in SAMPLES:
        r = {"id": sid}
        if img is not None:
            r["image"] = img
        if conv is not None:
            r["conversations"] = conv
        recs.append(r)
    (d / "data.json").write_text(json.dumps(recs))
    return d


@pytest.fixture(scope="module")
def report(processor, corpus, max_length):
    return check_dataset(Target(str(corpus / "data.json"), processor, max_length=max_length), progress=False)


@pytest.fixture(scope="module")
def model_dir(vlm, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "model"
    vlm.save_pretrained(d)
    return d


# ---- the report -----------------------------------------------------------------------------------
def test_counts_and_first_offenders(report, corpus):
    expected = {}
    for sid, kinds in ERRORS.items():
        for k in kinds:
            expected[k] = expected.get(k, 0) + 1
    assert {k: v["count"] for k, v in report["errors"].items()} == expected
    assert report["samples"] == report["checked"] == len(SAMPLES)
    assert report["bad_samples"] == len(ERRORS)
    index = {sid: i for i, (sid, _, _) in enumerate(SAMPLES)}
    for kind, entry in report["errors"].items():
        ids = [sid for sid in ERRORS if kind in ERRORS[sid]]
        assert [f["id"] for f in entry["first"]] == ids[:5]
        for f in entry["first"]:
            assert f["file"] == str(corpus / "data.json") and f["index"] == index[f["id"]] and f["message"]
    first = {k: v["first"][0]["message"] for k, v in report["errors"].items()}
    assert "missing.png" in first["missing_image"] and "truncated.png" in first["corrupt_image"]
    # 1e10 pixels: over PIL's own hard limit too, which refuses it inside Image.open (header only)
    assert "bomb.png" in first["image_too_large"] and "before decoding" in first["image_too_large"]


def test_notes_are_not_errors(report):
    notes = {k: [f["id"] for f in v["first"]] for k, v in report["notes"].items()}
    for sid, kind in NOTES.items():
        assert sid in notes[kind], (sid, kind, notes)
        assert sid not in ERRORS
    assert "orientation 6" in report["notes"]["exif_rotation"]["first"][0]["message"]


def test_same_errors_as_training(processor, corpus, max_length, report):
    """Each error check-data reports is the SampleError training raises for that sample (same kind, and
    the message names the dataset, sample and id); clean samples, notes included, load in training."""
    ds = ConversationDataset(str(corpus / "data.json"), processor, max_length=max_length)
    for i, (sid, _, _) in enumerate(SAMPLES):
        if sid in ERRORS:
            with pytest.raises(SampleError) as ei:
                ds[i]
            assert ei.value.kind == ERRORS[sid][0]
            assert f"sample {i} (id={sid})" in str(ei.value) and "data.json" in str(ei.value)
        else:
            out = ds[i]
            assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
            assert int((out["input_ids"] == processor.image_token_id).sum()) == PATCHES


def test_bomb_refused_in_training_before_decoding(processor, corpus, tmp_path):
    """The crafted 100000x100000 header is refused, never decoded; a real small image is refused under a
    lowered limit by vlmkit's own check (PIL alone would only warn at 1x its limit)."""
    with pytest.raises(ImageError) as ei:
        load_image(str(corpus / "bomb.png"))
    assert ei.value.kind == "image_too_large"
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    assert load_image(str(tmp_path / "big.png"), max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageError, match="40x30 = 1,200 pixels, over the limit of 1,199"):
        load_image(str(tmp_path / "big.png"), max_pixels=1199)
    (tmp_path / "d.json").write_text(json.dumps([{"id": "huge", "image": "big.png", "conversations": GOOD}]))
    ds = ConversationDataset(str(tmp_path / "d.json"), processor, max_image_pixels=1000)
    with pytest.raises(SampleError, match=r"d\.json: sample 0 \(id=huge\): image .*big\.png declares 40x30") as ei:
        ds[0]
    assert ei.value.kind == "image_too_large"
    assert "pixel_values" in ConversationDataset(str(tmp_path / "d.json"), processor, max_image_pixels=0)[0]
    r = check_dataset(Target(str(tmp_path / "d.json"), processor, max_image_pixels=1000), progress=False)
    assert r["errors"]["image_too_large"]["count"] == 1


def test_workers_give_the_same_report(processor, corpus, max_length, report):
    r = check_dataset(Target(str(corpus / "data.json"), processor, max_length=max_length), workers=1,
                      progress=False)
    assert r["errors"] == report["errors"] and r["notes"] == report["notes"]


def test_unreadable_dataset_file(processor, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    r = check_dataset(Target(str(tmp_path / "bad.json"), processor), progress=False)
    assert r["errors"]["unreadable_dataset"]["count"] == 1
    r = check_dataset(Target(str(tmp_path / "absent.json"), processor), progress=False)
    assert "absent.json" in r["errors"]["unreadable_dataset"]["first"][0]["message"]


# ---- the command ----------------------------------------------------------------------------------
def test_cli_model_dir(model_dir, corpus, max_length, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["check-data", str(corpus / "data.json"), "--model", str(model_dir), "--max-length", str(max_length),
               "--json", str(out)])
    assert rc == 1
    cap = capsys.readouterr()
    assert "ERROR" in cap.out and "missing_image" in cap.out and "mode_CMYK" in cap.out
    assert "#1 (id=gone)" in cap.out and f"{len(ERRORS)} sample(s)" in cap.out
    assert f"{len(SAMPLES)}/{len(SAMPLES)} samples" in cap.err  # progress
    rep = json.loads(out.read_text())
    assert rep["ok"] is False and rep["datasets"][0]["errors"]["image_too_large"]["first"][0]["id"] == "bomb"
    # a clean file: exit 0
    (tmp_path / "clean.json").write_text(json.dumps([{"id": "a", "image": str(corpus / "ok.png"),
                                                      "conversations": GOOD}]))
    # (its image named by absolute path: refused unless asked for, then accepted)
    assert main(["check-data", str(tmp_path / "clean.json"), "--model", str(model_dir), "--no-progress"]) == 1
    assert "image_outside_folder" in capsys.readouterr().out
    assert main(["check-data", str(tmp_path / "clean.json"), "--model", str(model_dir), "--no-progress",
                 "--allow-absolute-image-paths"]) == 0
    assert "OK, no errors" in capsys.readouterr().out


def test_cli_run_config_checks_each_stage(encoder_dirs, llm_dir, corpus, tmp_path, capsys):
    """Stage 1 (plain template, short max_length) and stage 2 (vicuna, long): each stage's own settings."""
    from dataclasses import asdict

    data = tmp_path / "stage.json"
    data.write_text(json.dumps([
        {"id": "cap", "image": "ok.png", "conversations": qa("<image>", "a red circle a green square")},
        {"id": "chat", "image": "ok.png", "conversations": qa()},
    ]))
    cfg = {"model": asdict(model_config(encoder_dirs["clip"], llm_dir)), "stages": [
        {"name": "pretrain", "train": {"connector": "full"},
         "data": {"path": str(data), "image_folder": str(corpus), "template": "plain", "max_length": PATCHES + 2}},
        {"name": "finetune", "train": {"connector": "full", "llm": "full"},
         "data": {"path": str(data), "image_folder": str(corpus), "max_length": 4 * PATCHES}},
    ], "train": {"output_dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "r.json"
    assert main(["check-data", "--config", str(tmp_path / "run.yaml"), "--json", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert [(d["template"], d["max_length"]) for d in rep["datasets"]] == [("plain", PATCHES + 2),
                                                                           ("vicuna_v1", 4 * PATCHES)]
    # plain: BOS + 16 image tokens + caption cut to 1 trained token: kept, noted as filling max_length
    assert rep["datasets"][0]["notes"]["at_max_length"]["count"] == 2
    capsys.readouterr()
    assert main(["check-data", "--config", str(tmp_path / "run.yaml"), "--max-length", str(PATCHES),
                 "--no-progress"]) == 1
    assert "too_long_for_images" in capsys.readouterr().out


def test_processor_without_weights_matches_the_model(vlm, model_dir, encoder_dirs, llm_dir, tmp_path):
    """load_processor / build_processor read no weights and give what VLM.processor() gives."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "model.safetensors").unlink()  # proves the weights are not read
    ref = vlm.processor()
    for proc in (load_processor(bare), build_processor(model_config(encoder_dirs["clip"], llm_dir))):
        assert proc.transform == ref.transform and proc.image_token_id == ref.image_token_id
        assert proc.count_image_tokens == ref.count_image_tokens and proc.template == ref.template
        im = Image.new("RGB", (30, 20), (1, 2, 3))
        a, b = proc(GOOD, [im]), ref(GOOD, [im])
        assert all(a[k].equal(b[k]) for k in ("input_ids", "labels", "pixel_values"))
    assert build_processor(model_config(encoder_dirs["clip"], llm_dir), template="plain").template == "plain"


def test_check_sample_reports_text_error_behind_image_error(processor, corpus, max_length):
    ds = ConversationDataset(str(corpus / "data.json"), processor, max_length=max_length, on_bad_sample="skip")
    i = [s[0] for s in SAMPLES].index("missing-and-miscounted")
    r = check_sample(ds, i)
    assert [k for k, _ in r["errors"]] == ["missing_image", "image_count_mismatch"]


# ---- the training path's pixels for unusual images -------------------------------------------------
def rgb(path_or_im, **kw):
    if isinstance(path_or_im, Image.Image):
        b = io.BytesIO()
        path_or_im.save(b, kw.pop("format", "PNG"), **kw)
        path_or_im = io.BytesIO(b.getvalue())
    im = load_image(path_or_im)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_cmyk():
    im = Image.frombytes("CMYK", (4, 1), bytes([0, 255, 255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 0, 0]))
    out = rgb(im, format="TIFF")
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255], [0, 255, 255]]
    # JPEG stores CMYK inverted (Adobe); the decoder undoes it
    out = rgb(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), format="JPEG", quality=95)
    assert np.abs(out - [255, 0, 0]).max() <= 8


def test_rgba_composited_on_white():
    a = np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [255, 0, 0, 128]]], np.uint8)
    out = rgb(Image.fromarray(a, "RGBA"))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent black -> white, not black
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.abs(out[0, 2] - [255, 127, 127]).max() <= 1


def test_la_and_palette_with_transparency():
    out = rgb(Image.fromarray(np.array([[[90, 255], [0, 0]]], np.uint8), "LA"))
    assert out[0].tolist() == [[90, 90, 90], [255, 255, 255]]
    p = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    out = rgb(p, transparency=1)
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255]]  # index 1 is transparent: white, not green


def test_16bit_rescaled():
    a = np.array([[0, 65535, 32768, 257]], np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    assert rgb(im)[0, :, 0].tolist() == [0, 255, 128, 1]
    # a dark 16-bit image stays dark (its values are 16-bit even when all are below 256)
    assert rgb(Image.fromarray(np.array([[0, 255]], np.uint16)))[0, :, 0].tolist() == [0, 1]


def test_greyscale_and_1bit():
    assert rgb(Image.new("L", (2, 1), 77))[0].tolist() == [[77, 77, 77]] * 2
    one = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert rgb(one)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6(tmp_path, fmt):
    """Orientation 6: the stored image is shown rotated 90 degrees clockwise. Stored w x h = 3 x 2 becomes
    2 x 3; the stored top-left pixel lands top-right, the stored top-right pixel bottom-right."""
    im, exif = exif_image(6)
    if fmt == "JPEG":  # JPEG is lossy: blow each pixel up to an 8x8 block and sample block centres
        im = im.resize((24, 16), Image.Resampling.NEAREST)
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    out = load_image(str(path))
    s = 1 if fmt == "PNG" else 8
    assert out.size == (2 * s, 3 * s)
    a = np.asarray(out).astype(int)

    def px(x, y):
        return a[y * s + s // 2, x * s + s // 2]

    tol = 0 if fmt == "PNG" else 24
    assert np.abs(px(1, 0) - [255, 0, 0]).max() <= tol  # stored (0, 0): top-left -> top-right
    assert np.abs(px(1, 2) - [0, 255, 0]).max() <= tol  # stored (2, 0): top-right -> bottom-right
    assert np.abs(px(0, 0) - [0, 0, 255]).max() <= tol
