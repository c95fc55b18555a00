"""Video samples in the data path: ConversationDataset (JSON / JSONL / parquet, LLaVA and messages layouts), the
stage's data.* video keys, the time prompt, mixing with images and text, bad videos, grouping and streaming."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from test_video_model import cached
from vlmkit.config import DataConfig
from vlmkit.data import collate
from vlmkit.data.conversation import SampleError
from vlmkit.data.dataset import ConversationDataset, VideoOptions, add_time_prompt
from vlmkit.data.formats import to_sample
from vlmkit.data.streaming import StreamingConversations
from vlmkit.data.video import Video, time_instruction
from vlmkit.experiments import video_demo as D
from vlmkit.training.batches import make_dataset


def square_frames(n: int, size: int = 16) -> list[np.ndarray]:
    return [D.draw(size, [("red", "square", i, 4, 4)]) for i in range(n)]


def write_media(root) -> None:
    """clip.mp4 (12 frames at 8 fps, 1.5 s), frames/ (5 PNGs), pic.png."""
    D.write_mp4(root / "clip.mp4", square_frames(12), rate=8)
    (root / "frames").mkdir()
    for i, f in enumerate(square_frames(5)):
        Image.fromarray(f).save(root / "frames" / f"f{i}.png")
    Image.new("RGB", (10, 10), (0, 90, 200)).save(root / "pic.png")


SAMPLES = [
    {"id": "v", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhere does it go?"},
                                                       {"from": "gpt", "value": "right"}]},
    {"id": "f", "video": "frames/", "conversations": [{"from": "human", "value": "<video>\nWhat color?"},
                                                      {"from": "gpt", "value": "red"}]},
    {"id": "i", "image": "pic.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                      {"from": "gpt", "value": "blue"}]},
    {"id": "t", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
]


@pytest.fixture
def mixed(tmp_path):
    write_media(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(SAMPLES))
    return tmp_path


def n_video_tokens(model, s) -> int:
    return int((s["input_ids"] == model.video_token_id).sum())


def test_mixed_json_reads_videos_folders_images_and_text(tok_dir, mixed):
    model = cached(tok_dir)
    ds = make_dataset(DataConfig(path=str(mixed / "data.json"), max_frames=4, num_workers=0), model.processor())
    v, f, i, t = (ds[k] for k in range(4))
    assert v["frames_per_video"].tolist() == [4] and v["pixel_values_videos"].shape == (4, 3, 16, 16)
    assert n_video_tokens(model, v) == 4 * 4 + 1  # 2x2 pooled grid per frame + one newline
    assert f["frames_per_video"].tolist() == [4] and i["frames_per_video"].tolist() == []
    assert i["pixel_values"].shape[0] == 1 and t["pixel_values_videos"].shape[0] == 0
    # the frames are the sampled ones: floor(linspace(0, 11, 4)) = 0, 3, 7, 11 of the clip
    clip = [Image.fromarray(a) for a in square_frames(12)]
    every = torch.stack([model.processor().transform(c) for c in clip])  # [12, 3, 16, 16]
    err = (v["pixel_values_videos"][:, None] - every[None]).abs().mean(dim=(2, 3, 4))  # [4, 12]
    assert err.argmin(dim=1).tolist() == [0, 3, 7, 11]  # each decoded frame is nearest its own source frame
    b = collate([v, f, i, t], 0)  # one batch of every modality, through the model
    assert b["videos_per_sample"].tolist() == [1, 1, 0, 0] and b["pixel_values_videos"].shape[0] == 8
    assert torch.isfinite(model(**b))
    # words + the model's count at max_frames (17) per video, + 128 per image; videos count as multimodal
    assert ds.modality_lengths() == [(6 + 17, 1), (4 + 17, 1), (4 + 128, 1), (3, 0)]


def test_decoded_in_the_loader_workers_from_jsonl(tok_dir, mixed):
    model = cached(tok_dir)
    (mixed / "data.jsonl").write_text("\n".join(json.dumps(s) for s in SAMPLES))
    ds = make_dataset(DataConfig(path=str(mixed / "data.jsonl"), max_frames=3), model.processor())
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=lambda s: collate(s, 0))
    b = next(iter(loader))
    assert b["ids"] == ["v", "f", "i", "t"] and b["frames_per_video"].tolist() == [3, 3]


def test_budget_lowers_frames_before_decoding_and_fps_samples_by_time(tok_dir, mixed):
    model = cached(tok_dir)
    ds = make_dataset(DataConfig(path=str(mixed / "data.json"), max_frames=8, max_video_tokens=14),
                      model.processor())
    assert ds[0]["frames_per_video"].tolist() == [3]  # 4 * 3 + 1 = 13 <= 14 < 17
    assert ds.modality_lengths()[0] == (6 + 14, 1)  # the budget bounds the estimate
    fps = make_dataset(DataConfig(path=str(mixed / "data.json"), max_frames=8, fps=2.0), model.processor())
    assert fps[0]["frames_per_video"].tolist() == [3]  # every 4th frame of 12 at 8 fps: 0, 4, 8
    tiny = make_dataset(DataConfig(path=str(mixed / "data.json"), max_video_tokens=4, on_bad_sample="skip"),
                        model.processor())
    assert tiny[0]["skipped"]["kind"] == "video_too_long"


def test_time_prompt_goes_between_the_video_and_the_question(tok_dir, mixed):
    video = Video(frames=[None, None], timestamps=[0.0, 1.25], duration=1.5)
    turns = add_time_prompt(SAMPLES[0]["conversations"], [video])
    assert turns[0]["value"] == f"<video>\n{time_instruction(video)}\nWhere does it go?"
    assert turns[1] == SAMPLES[0]["conversations"][1] and SAMPLES[0]["conversations"][0]["value"].startswith("<video>\nW")
    assert time_instruction(video).startswith("The video lasts for 1.50 seconds, and 2 frames are uniformly sampled")
    model = cached(tok_dir)
    proc = model.processor()
    on = make_dataset(DataConfig(path=str(mixed / "data.json"), max_frames=2, video_time_prompt=True), proc)
    off = make_dataset(DataConfig(path=str(mixed / "data.json"), max_frames=2), proc)
    rec = on.record(0)
    videos = on.videos(rec)
    assert on.conversations(rec, videos)[0]["value"] == (
        "<video>\nThe video lasts for 1.50 seconds, and 2 frames are uniformly sampled from it. These frames are "
        "located at 0.00s,1.38s.Please answer the following questions related to this video.\nWhere does it go?")
    assert torch.equal(on[0]["input_ids"], proc(on.conversations(rec, videos), [], videos=videos)["input_ids"])
    assert len(on[0]["input_ids"]) > len(off[0]["input_ids"]) and torch.equal(on[2]["input_ids"], off[2]["input_ids"])


def test_video_folder_and_confinement(tok_dir, mixed, tmp_path_factory):
    model = cached(tok_dir)
    other = tmp_path_factory.mktemp("videos")
    D.write_mp4(other / "clip.mp4", square_frames(4), rate=4)
    data = [dict(SAMPLES[0], video="clip.mp4"), dict(SAMPLES[0], id="out", video="../x/clip.mp4"),
            dict(SAMPLES[0], id="gone", video="nope.mp4")]
    (mixed / "v.json").write_text(json.dumps(data))
    ds = make_dataset(DataConfig(path=str(mixed / "v.json"), video_folder=str(other), on_bad_sample="skip"),
                      model.processor())
    assert ds[0]["frames_per_video"].tolist() == [4]  # the 4-frame clip of video_folder, not the 12-frame one
    assert ds[1]["skipped"]["kind"] == "video_outside_folder"
    gone = ds[2]["skipped"]
    assert gone["kind"] == "video_missing" and gone["id"] == "gone" and "nope.mp4" in gone["reason"]
    strict = make_dataset(DataConfig(path=str(mixed / "v.json"), video_folder=str(other)), model.processor())
    with pytest.raises(SampleError, match=r"v\.json: sample 2 \(id=gone\): video not found: .*nope\.mp4") as e:
        strict[2]
    assert e.value.kind == "video_missing"


def test_bad_video_samples_are_counted_by_kind(tok_dir, vlm, mixed):
    (mixed / "junk.mp4").write_bytes(b"not a video at all" * 50)
    data = [dict(SAMPLES[0], video="junk.mp4"), dict(SAMPLES[0], video=""), dict(SAMPLES[0], video=3),
            dict(SAMPLES[0], video=["clip.mp4", "clip.mp4"]), SAMPLES[0]]
    (mixed / "bad.json").write_text(json.dumps(data))
    ds = make_dataset(DataConfig(path=str(mixed / "bad.json"), on_bad_sample="skip"), cached(tok_dir).processor())
    kinds = [ds[k].get("skipped", {}).get("kind") for k in range(5)]
    assert kinds == ["video_corrupt", "invalid_sample", "invalid_sample", "video_count_mismatch", None]
    assert "video 0: expected a path" in ds[2]["skipped"]["reason"]
    no_video_model = make_dataset(DataConfig(path=str(mixed / "bad.json"), on_bad_sample="skip"), vlm.processor())
    assert no_video_model[4]["skipped"]["kind"] == "video_count_mismatch"
    assert "this model takes no video" in no_video_model[4]["skipped"]["reason"]


def test_messages_layouts_take_videos():
    trl = {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"},
                                                     {"type": "text", "text": "What happens?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "It moves."}]}]}
    assert to_sample(trl) == {"conversations": [{"role": "user", "content": "<video>\nWhat happens?"},
                                                {"role": "assistant", "content": "It moves."}],
                              "images": [], "videos": ["a.mp4"]}
    listed = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                        {"type": "text", "text": "Q"}]}],
              "videos": ["a.mp4"], "images": ["b.png"]}
    assert to_sample(listed)["conversations"][0]["content"] == "<video>\n<image>\nQ"
    assert to_sample(listed)["videos"] == ["a.mp4"] and to_sample(listed)["images"] == ["b.png"]
    factory = {"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "So."}],
               "videos": ["c.mp4"]}
    assert to_sample(factory)["videos"] == ["c.mp4"]
    assert to_sample({"clip": "d.mp4", "conversations": []}, columns={"video": "clip"})["video"] == "d.mp4"
    with pytest.raises(SampleError, match="videos both in the 'videos' field and inside the messages' video parts"):
        to_sample(dict(trl, videos=["a.mp4"]))


def test_messages_and_parquet_video_samples_train_inputs(tok_dir, mixed):
    import pandas as pd

    model = cached(tok_dir)
    rows = [{"id": "m", "messages": [{"role": "user", "content": "<video>What color?"},
                                     {"role": "assistant", "content": "red"}], "videos": ["frames/"]}]
    pd.DataFrame(rows).to_parquet(mixed / "m.parquet")
    ds = make_dataset(DataConfig(path=str(mixed / "m.parquet"), max_frames=5), model.processor())
    s = ds[0]
    assert s["frames_per_video"].tolist() == [5] and n_video_tokens(model, s) == 21 and s["id"] == "m"


def test_streaming_reads_video_samples(tok_dir, mixed):
    model = cached(tok_dir)
    (mixed / "data.jsonl").write_text("\n".join(json.dumps(s) for s in SAMPLES))
    ds = make_dataset(DataConfig(path=str(mixed / "data.jsonl"), streaming=True, max_frames=2), model.processor())
    assert isinstance(ds, StreamingConversations) and ds.samples.video == VideoOptions(max_frames=2)
    ds.collate, ds.batch_size = (lambda s: collate(s, 0)), 2
    batches = list(ds)
    assert [b["ids"] for b in batches] == [["v", "f"], ["i", "t"]]
    assert batches[0]["frames_per_video"].tolist() == [2, 2] and batches[1]["videos_per_sample"].tolist() == [0, 0]


def test_check_data_reports_each_bad_video_with_its_kind(tok_dir, mixed):
    from vlmkit.check_data import ERRORS, Target, check_dataset

    (mixed / "junk.mp4").write_bytes(b"not a video at all" * 50)
    (mixed / "empty").mkdir()
    q = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "red"}]
    data = [{"id": "ok", "video": "clip.mp4", "conversations": q},
            {"id": "gone", "video": "nope.mp4", "conversations": q},
            {"id": "junk", "video": "junk.mp4", "conversations": q},
            {"id": "empty", "video": "empty", "conversations": q},
            {"id": "both", "video": "nope.mp4", "conversations": [{"from": "human", "value": "What?"},
                                                                  {"from": "gpt", "value": "<video>"}]},
            {"id": "two", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video><video> Q"},
                                                                 q[1]]}]
    (mixed / "c.json").write_text(json.dumps(data))
    proc = cached(tok_dir).processor()
    r = check_dataset(Target(str(mixed / "c.json"), proc, video=VideoOptions(max_frames=4)), progress=False)
    got = {k: [e["id"] for e in v["first"]] for k, v in r["errors"].items()}
    assert got == {"video_missing": ["gone", "both"], "video_corrupt": ["junk"], "video_no_frames": ["empty"],
                   "video_in_assistant_turn": ["both"], "video_count_mismatch": ["two"]}
    assert r["bad_samples"] == 5 and all(k in ERRORS for k in got)
    assert "nope.mp4" in r["errors"]["video_missing"]["first"][0]["message"]
    # the model's budget: 4 * n + 1 tokens; 4 tokens cannot hold one frame
    small = check_dataset(Target(str(mixed / "c.json"), proc, video=VideoOptions(max_video_tokens=4)),
                          progress=False)
    assert [e["id"] for e in small["errors"]["video_too_long"]["first"]] == ["ok", "two"]
    big = check_dataset(Target(str(mixed / "c.json"), proc, video=VideoOptions(max_frame_pixels=100)),
                        progress=False)
    assert [e["id"] for e in big["errors"]["video_too_large"]["first"]] == ["ok", "two"]


def test_check_data_cli_takes_the_video_keys(tok_dir, mixed, tmp_path, capsys):
    """`vlmkit check-data DATA --model DIR` with --max-video-tokens / --video-folder / --max-frames: the same kinds
    as the stage keys give (exit 1 with bad samples, 0 without)."""
    import shutil

    from vlmkit.cli import main

    model_dir, here = tmp_path / "model", tmp_path / "elsewhere"  # (mixed is tmp_path: clip.mp4 is there)
    cached(tok_dir).save_pretrained(model_dir)
    here.mkdir()
    q = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "red"}]
    (here / "d.json").write_text(json.dumps([{"id": "ok", "video": "clip.mp4", "conversations": q}]))
    base = ["check-data", str(here / "d.json"), "--model", str(model_dir), "--no-progress", "--json", "-"]
    assert main(base + ["--video-folder", str(mixed)]) == 0
    assert main(base + ["--video-folder", str(mixed), "--max-video-tokens", "4"]) == 1  # one frame needs 5
    assert '"video_too_long"' in capsys.readouterr().out
    assert main(base) == 1  # clip.mp4 is not beside d.json
    assert '"video_missing"' in capsys.readouterr().out
    shutil.copy(mixed / "clip.mp4", here / "clip.mp4")
    assert main(base + ["--max-frames", "2", "--max-video-tokens", "9"]) == 0  # 2 frames: 4 * 2 + 1 tokens
