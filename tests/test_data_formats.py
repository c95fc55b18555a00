"""Data paths and sample layouts: every source (JSON, JSONL, parquet, arrow, folders of shards, saved datasets,
hub ids) and every layout (LLaVA, TRL typed messages, LLaMA-Factory / ms-swift messages, mapped columns) gives
exactly the ids, labels and pixels of the equivalent LLaVA JSON; bad data is named; check-data reads them all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from vlmkit.check_data import Target, check_dataset
from vlmkit.config import ConfigError, DataConfig, StageConfig
from vlmkit.data.conversation import SampleError
from vlmkit.data.dataset import ConversationDataset, DatasetError
from vlmkit.data.sampler import ModalityLengthBatchSampler
from vlmkit.training.batches import make_dataset

COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0), (90, 30, 160)]
# (id, system, images, [(user text, images before it, answer)])
SAMPLES = [
    ("s0", None, ["0.png"], [("What color is the shape?", 1, "red")]),
    ("s1", "Be brief.", ["1.png", "2.png"], [("How many shapes are there?", 2, "two")]),
    ("s2", None, [], [("hello world", 0, "hello")]),
    ("s3", None, ["3.png"], [("Describe the image.", 1, "a yellow circle"), ("What color?", 0, "yellow")]),
    ("s4", None, ["4.png"], [("What color is the shape?", 1, "one two three")]),
]


def llava(sid, system, images, turns, single: bool = False):
    """A LLaVA record; `single`: one image as a bare path (JSON allows it; a table column needs one type)."""
    conv = [{"from": "system", "value": system}] if system else []
    for text, k, answer in turns:
        conv += [{"from": "human", "value": "<image>\n" * k + text}, {"from": "gpt", "value": answer}]
    rec = {"id": sid, "conversations": conv}
    if images:
        rec["image"] = images[0] if single and len(images) == 1 else list(images)
    return rec


def plain_messages(sid, system, images, turns):
    """LLaMA-Factory / ms-swift: role/content strings with <image>, `images` paths."""
    msgs = [{"role": "system", "content": system}] if system else []
    for text, k, answer in turns:
        msgs += [{"role": "user", "content": "<image>\n" * k + text}, {"role": "assistant", "content": answer}]
    return {"id": sid, "messages": msgs, "images": list(images)}


def typed_messages(sid, system, images, turns, folder: Path):
    """TRL / hub VLM datasets: typed content lists, images as PNG bytes (an HF Image feature once cast)."""
    def text(t):
        return {"type": "text", "text": t}

    msgs = [{"role": "system", "content": [text(system)]}] if system else []
    for t, k, answer in turns:
        msgs += [{"role": "user", "content": [{"type": "image", "text": None}] * k + [text(t)]},
                 {"role": "assistant", "content": [text(answer)]}]
    return {"id": sid, "messages": msgs, "images": [{"bytes": (folder / f).read_bytes(), "path": None} for f in images]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    for i, c in enumerate(COLORS):
        Image.new("RGB", (16 + 2 * i, 16), c).save(d / f"{i}.png")
    (d / "llava.json").write_text(json.dumps([llava(*s, single=True) for s in SAMPLES]))
    return d


@pytest.fixture(scope="module")
def reference(data, processor):
    ds = ConversationDataset(str(data / "llava.json"), processor)
    return [ds[i] for i in range(len(ds))]


def assert_same(ds, reference):
    assert len(ds) == len(reference)
    for i, ref in enumerate(reference):
        out = ds[i]
        assert "skipped" not in out, out
        assert out["id"] == ref["id"] == SAMPLES[i][0]
        assert torch.equal(out["input_ids"], ref["input_ids"]) and torch.equal(out["labels"], ref["labels"])
        assert torch.equal(out["pixel_values"], ref["pixel_values"])


def typed_dataset(data) -> datasets.Dataset:
    ds = datasets.Dataset.from_list([typed_messages(*s, data) for s in SAMPLES])
    return ds.cast_column("images", datasets.List(datasets.Image()))


# ---- sources ------------------------------------------------------------------------------------------------
def test_jsonl_parquet_arrow_and_saved_folders_equal_the_llava_json(data, processor, reference, tmp_path):
    recs = [llava(*s) for s in SAMPLES]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrow) == 1
    shutil.copy(arrow[0], tmp_path / "d.arrow")
    for name in ("d.jsonl", "d.parquet", "d.arrow", "saved", "saved_dict"):
        assert_same(ConversationDataset(str(tmp_path / name), processor, image_folder=str(data)), reference)


def test_folders_of_shards_are_read_whole_in_sorted_order(data, processor, reference, tmp_path):
    recs = [llava(*s) for s in SAMPLES]
    (tmp_path / "pq").mkdir()
    (tmp_path / "js").mkdir()
    # written in reverse: only the sorted name order gives the reference order
    for name, part in (("train-00001-of-00002", recs[3:]), ("train-00000-of-00002", recs[:3])):
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / "pq" / f"{name}.parquet"))
        (tmp_path / "js" / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    for folder in ("pq", "js"):
        assert_same(ConversationDataset(str(tmp_path / folder), processor, image_folder=str(data)), reference)
    (tmp_path / "js" / "extra.parquet").write_bytes((tmp_path / "pq" / "train-00000-of-00002.parquet").read_bytes())
    with pytest.raises(DatasetError, match=r"js: a folder of files of different kinds \(\.jsonl, \.parquet\)"):
        ConversationDataset(str(tmp_path / "js"), processor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: a folder with no dataset files"):
        ConversationDataset(str(tmp_path / "empty"), processor)


def test_a_broken_parquet_file_is_named(processor, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"bad\.parquet: cannot read as parquet"):
        ConversationDataset(str(tmp_path / "bad.parquet"), processor)
    datasets.Dataset.from_list([llava(*SAMPLES[0])]).to_parquet(str(tmp_path / "named.json.bin"))
    with pytest.raises(DatasetError, match=r"named\.json\.bin: a parquet file: name it \.parquet"):
        ConversationDataset(str(tmp_path / "named.json.bin"), processor)


def test_hub_ids_go_to_load_dataset_without_remote_code(data, processor, reference, monkeypatch):
    calls = []
    recs = datasets.Dataset.from_list([llava(*s) for s in SAMPLES])

    def fake(*args, **kw):
        calls.append((args, kw))
        return recs

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert_same(ConversationDataset("someorg/vqa-set", processor, image_folder=str(data)), reference)
    ConversationDataset("hf:someorg/vqa-set:validation", processor, image_folder=str(data))
    ConversationDataset("someorg/vqa-set:test", processor, image_folder=str(data))
    assert calls == [(("someorg/vqa-set",), {"split": "train", "streaming": False}),
                     (("someorg/vqa-set",), {"split": "validation", "streaming": False}),
                     (("someorg/vqa-set",), {"split": "test", "streaming": False})]
    with pytest.raises(FileNotFoundError, match="dataset file not found: missing/file.json"):
        ConversationDataset("missing/file.json", processor)  # a file name, not a hub id

    def offline(*args, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match=r"someorg/typo: not a local file or folder, and loading it as a hub "
                                           r"dataset \(split train\) failed: ConnectionError: no network"):
        ConversationDataset("someorg/typo", processor)


# ---- layouts ------------------------------------------------------------------------------------------------
def test_trl_typed_messages_with_hf_images_equal_llava(data, processor, reference, tmp_path):
    typed_dataset(data).to_parquet(str(tmp_path / "trl.parquet"))
    ds = ConversationDataset(str(tmp_path / "trl.parquet"), processor)
    assert isinstance(ds.records[0]["images"][0], Image.Image)  # decoded by the Image feature
    assert_same(ds, reference)
    assert_same(ConversationDataset(str(tmp_path / "trl.parquet"), processor, format="messages"), reference)
    # the same records as plain Python: {"bytes"} dicts, and images inside the content parts
    recs = [typed_messages(*s, data) for s in SAMPLES]
    inline = []
    for r in recs:
        imgs = iter(r.pop("images"))
        for m in r["messages"]:
            m["content"] = [dict(p, image=next(imgs)) if p["type"] == "image" else p for p in m["content"]]
        inline.append(r)
    (tmp_path / "inline.jsonl").write_text("\n".join(json.dumps(r, default=lambda b: None) for r in inline))
    ds = ConversationDataset(str(tmp_path / "inline.jsonl"), processor)
    ds.records = inline  # bytes do not survive JSON: the records as a Python source gives them
    assert_same(ds, reference)


def test_llama_factory_messages_and_mapped_columns_equal_llava(data, processor, reference, tmp_path):
    recs = [plain_messages(*s) for s in SAMPLES]
    (tmp_path / "lf.json").write_text(json.dumps(recs))
    assert_same(ConversationDataset(str(tmp_path / "lf.json"), processor, image_folder=str(data)), reference)
    mapped = [{"uid": r["id"], "dialogue": r["messages"], "pics": r["images"]} for r in recs]
    datasets.Dataset.from_list(mapped).to_parquet(str(tmp_path / "mapped.parquet"))
    cols = {"id": "uid", "messages": "dialogue", "images": "pics"}
    assert_same(ConversationDataset(str(tmp_path / "mapped.parquet"), processor, image_folder=str(data),
                                    columns=cols), reference)
    cfg = DataConfig(path=str(tmp_path / "mapped.parquet"), image_folder=str(data), columns=cols)
    assert_same(make_dataset(cfg, processor), reference)
    llava_mapped = [{"id": s[0], "turns": llava(*s)["conversations"], "img": llava(*s).get("image")} for s in SAMPLES]
    (tmp_path / "lm.json").write_text(json.dumps(llava_mapped))
    assert_same(ConversationDataset(str(tmp_path / "lm.json"), processor, image_folder=str(data),
                                    columns={"conversations": "turns", "image": "img"}), reference)


def test_bad_layouts_get_one_clear_error_per_sample(data, processor, tmp_path):
    good = plain_messages(*SAMPLES[0])
    recs = [
        dict(good, images=["0.png", "1.png"]),  # 1 placeholder, 2 images
        {"id": "nolayout", "text": "hi"},
        dict(good, images=["../outside.png"]),
        {"id": "badpart", "messages": [{"role": "user", "content": [{"type": "audio"}]}], "images": []},
        {"id": "notlist", "messages": "hello"},
    ]
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    ds = ConversationDataset(str(tmp_path / "bad.json"), processor, image_folder=str(data))
    expect = [("image_count_mismatch", "1 <image> placeholder(s) in the text but 2 image(s)"),
              ("invalid_sample", "no 'conversations' field (LLaVA layout) or 'messages' field (TRL / LLaMA-Factory "
                                 "layout); the sample has: id, text"),
              ("image_outside_folder", "'..' climbs out of it"),
              ("invalid_sample", "turn 0: content part 0: expected {\"type\": \"text\" | \"image\" | \"video\", ...}"),
              ("invalid_sample", "'messages' must be a list of turns, got str")]
    for i, (kind, text) in enumerate(expect):
        with pytest.raises(SampleError) as err:
            ds[i]
        assert err.value.kind == kind and text in str(err.value) and f"bad.json: sample {i} (id=" in str(err.value)
    with pytest.raises(SampleError, match="no 'conversations' field \\(data.format: llava\\)"):
        ConversationDataset(str(tmp_path / "bad.json"), processor, format="llava")[1]
    with pytest.raises(SampleError, match="no 'pics' field \\(data.columns maps images to it"):
        ConversationDataset(str(tmp_path / "bad.json"), processor, columns={"images": "pics"})[0]


def test_data_config_validates_the_new_keys():
    with pytest.raises(ConfigError, match="data.format must be one of auto, llava, messages, got 'sharegpt'"):
        DataConfig(path="x.json", format="sharegpt")
    with pytest.raises(ConfigError, match="data.columns: unknown field\\(s\\) 'convs'"):
        DataConfig(path="x.json", columns={"convs": "c"})
    with pytest.raises(ConfigError, match="not with data.streaming"):
        DataConfig(path="x.json", streaming=True, group_by_modality_length=True)
    with pytest.raises(ConfigError, match="stage 's': data.streaming has no length to count epochs in: set max_steps"):
        StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x.jsonl", streaming=True))
    StageConfig(name="s", train={"connector": "full"}, data=DataConfig(path="x.jsonl", streaming=True), max_steps=3)


def test_check_data_reads_every_layout_and_reports_the_same_kinds(data, processor, tmp_path):
    typed = typed_dataset(data).to_list()
    typed[1]["images"] = typed[1]["images"][:1]  # two placeholders, one image
    ds = datasets.Dataset.from_list(typed).cast_column("images", datasets.List(datasets.Image()))
    ds.to_parquet(str(tmp_path / "trl.parquet"))
    mapped = [{"d": r["messages"], "p": r["images"]} for r in map(lambda s: plain_messages(*s), SAMPLES)]
    mapped[2]["p"] = ["missing.png"]
    (tmp_path / "lf.jsonl").write_text("\n".join(json.dumps(r) for r in mapped))
    rep = check_dataset(Target(str(tmp_path / "trl.parquet"), processor), progress=False)
    assert rep["samples"] == rep["checked"] == 5 and rep["bad_samples"] == 1
    assert list(rep["errors"]) == ["image_count_mismatch"] and rep["errors"]["image_count_mismatch"]["first"][0]["id"] == "s1"
    rep = check_dataset(Target(str(tmp_path / "lf.jsonl"), processor, image_folder=str(data),
                               columns={"messages": "d", "images": "p"}), progress=False)
    assert rep["bad_samples"] == 1 and set(rep["errors"]) == {"missing_image", "image_count_mismatch"}
    assert rep["images"] == 6  # s2 names one image though its text has no placeholder


# ---- grouping by modality and length ---------------------------------------------------------------------------
def lengths_of(n: int, seed: int = 0) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(5, 400, (1,), generator=g)), int(torch.randint(0, 3, (1,), generator=g)))
            for _ in range(n)]


@pytest.mark.parametrize("n,batch,world", [(37, 4, 1), (50, 3, 2), (7, 2, 4)])
def test_modality_length_batches_are_single_modality_sorted_and_cover_each_sample_once(n, batch, world):
    lengths = lengths_of(n)
    samplers = [ModalityLengthBatchSampler(lengths, batch, world, rank, seed=3) for rank in range(world)]
    for s in samplers:
        s.set_epoch(1)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])  # same steps everywhere
    seen = []
    for step in zip(*per_rank):  # one megabatch: every process's micro-batch of one step
        mm = {lengths[i][1] > 0 for b in step for i in b}
        assert len(mm) == 1  # one modality per megabatch
        for b in step:
            assert 1 <= len(b) <= batch and [lengths[i][0] for i in b] == sorted((lengths[i][0] for i in b), reverse=True)
        seen += [i for b in step for i in b]
    mm = sum(k > 0 for _, k in lengths)
    short = [r for r in (mm % (world * batch), (n - mm) % (world * batch)) if 0 < r < world]
    # every sample exactly once; a partial megabatch with fewer samples than processes gives each empty process
    # one of its samples again
    assert len(seen) == n + sum(world - r for r in short) and set(seen) == set(range(n))
    assert (world, batch) != (1, 4) or not short
    again = ModalityLengthBatchSampler(lengths, batch, world, 0, seed=3)
    again.set_epoch(1)
    assert list(again) == per_rank[0]  # deterministic under (seed, epoch)
    again.set_epoch(2)
    assert list(again) != per_rank[0]
    big = ModalityLengthBatchSampler(lengths, batch, world, 0, seed=2**64 - 1)  # torch.initial_seed() unseeded
    assert len(big) == len(again) and {i for b in big for i in b} <= set(range(n))


def test_modality_lengths_are_estimated_from_the_text_without_decoding(data, processor, tmp_path):
    typed_dataset(data).to_parquet(str(tmp_path / "trl.parquet"))
    ds = ConversationDataset(str(tmp_path / "trl.parquet"), processor)
    words = [len(" ".join(t + " " + a for t, _, a in s[3]).split()) + (len(s[1].split()) if s[1] else 0)
             + sum(k for _, k, _ in s[3]) for s in SAMPLES]  # each <image> is a word of LLaVA's text too
    assert ds.modality_lengths() == [(w + 128 * len(s[2]), len(s[2])) for w, s in zip(words, SAMPLES)]


def test_the_7b_recipes_group_stage_2_by_modality_and_length():
    from vlmkit.config import load_config

    root = Path(__file__).resolve().parent.parent / "recipes" / "configs"
    for name in ("llava15_7b.yaml", "llava_next_7b.yaml"):
        stages = {s.name: s.data for s in load_config(root / name).stages}
        assert stages["finetune"].group_by_modality_length and not stages["pretrain"].group_by_modality_length


def test_check_data_command_takes_format_and_column_flags(data, vlm, tmp_path, capsys):
    from vlmkit.cli import main

    vlm.save_pretrained(tmp_path / "model")
    recs = [{"uid": s[0], "d": plain_messages(*s)["messages"], "p": list(s[2])} for s in SAMPLES]
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "m.parquet"))
    base = ["check-data", str(tmp_path / "m.parquet"), "--model", str(tmp_path / "model"), "--image-folder",
            str(data), "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(base + ["--column", "messages=d", "--column", "images=p", "--column", "id=uid",
                        "--format", "messages"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["datasets"][0]
    assert report["samples"] == 5 and report["bad_samples"] == 0 and report["images"] == 5
    assert main(base) == 1  # without the mapping: no known layout, every sample named
    report = json.loads((tmp_path / "r.json").read_text())["datasets"][0]
    assert report["errors"]["invalid_sample"]["count"] == 5
    assert "no 'conversations' field (LLaVA layout) or 'messages' field" in report["errors"]["invalid_sample"]["first"][0]["message"]
    capsys.readouterr()
    assert main(base + ["--column", "pics"]) == 1
    assert "--column 'pics': expected FIELD=COLUMN" in capsys.readouterr().err
