"""Video decoding, sampling and the video demo's data (vlmkit/data/video.py, vlmkit/experiments/video_demo.py)."""
from __future__ import annotations

import json
import os
import random
import wave

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlmkit.config import ConfigError, DataConfig, from_dict
from vlmkit.data import video as V
from vlmkit.experiments import video_demo as D


def moving_square(n: int, size: int = 32, side: int = 6, step: int = 2) -> list[np.ndarray]:
    """A red square whose left edge is at x = step * i in frame i."""
    return [D.draw(size, [("red", "square", step * i, 4, side)]) for i in range(n)]


def square_x(frame) -> int:
    """Left edge of the red square in a decoded frame (columns where red dominates)."""
    a = np.asarray(frame).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)
    return int(np.nonzero(red.any(axis=0))[0][0])


def index_clip(path, n: int, rate: int = 25, gop: int = 10, size: int = 32) -> None:
    """Frame i is flat grey level i (i < 220): which frame a decoded frame is can be read back."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop
        s.options = {"preset": "ultrafast", "crf": "0", "bf": "0"}
        for i in range(n):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), i, np.uint8), format="rgb24")))
        c.mux(s.encode())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    D.write_mp4(d / "move.mp4", moving_square(12), rate=8)
    D.write_mp4(d / "move.mkv", moving_square(12), rate=8)  # Matroska stores no frame count
    index_clip(d / "index.mp4", 200)
    return d


# --- headers ---------------------------------------------------------------------------------------------------

def test_probe_reads_the_headers(clips):
    assert V.probe(str(clips / "move.mp4")) == V.VideoInfo(12, 8.0, 1.5, 32, 32, False)
    assert V.probe(str(clips / "move.mkv")) == V.VideoInfo(12, 8.0, 1.5, 32, 32, True)  # 1.5 s x 8 fps
    assert V.probe(str(clips / "index.mp4")) == V.VideoInfo(200, 25.0, 8.0, 32, 32, False)


def _kind(fn, *args, **kw) -> str:
    with pytest.raises(V.VideoError) as e:
        fn(*args, **kw)
    return e.value.kind


def test_bad_files_have_their_kinds(tmp_path, clips):
    (tmp_path / "junk.mp4").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "text.mp4").write_text("not a video")
    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:  # a container with no video stream
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    with av.open(str(tmp_path / "empty.avi"), "w") as c:  # a video stream with no frames
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    (tmp_path / "nothing").mkdir()  # a frame folder without images
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    expect = {"missing.mp4": "video_missing", "junk.mp4": "video_corrupt", "text.mp4": "video_corrupt",
              "sound.wav": "video_corrupt", "empty.avi": "video_no_frames", "nothing": "video_no_frames"}
    for name, kind in expect.items():
        assert _kind(V.load_video, name, str(tmp_path)) == kind, name
        [problem] = V.check_video(name, str(tmp_path))
        assert problem.kind == kind, name
        assert name in problem.message
    assert V.check_video("move.mp4", str(clips)) == []


def test_too_large_and_too_long_are_refused_before_decoding(clips, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(V, "_decode_file", no_decoding)
    with pytest.raises(V.VideoError, match=r"32x32 = 1,024 pixels per frame, over the limit of 1,023") as e:
        V.load_video("move.mp4", str(clips), max_frame_pixels=32 * 32 - 1)
    assert e.value.kind == "video_too_large"
    with pytest.raises(V.VideoError, match=r"lasts 1.50 s, over data.max_video_seconds = 1.4") as e:
        V.load_video("move.mp4", str(clips), max_duration=1.4)
    assert e.value.kind == "video_too_long"
    with pytest.raises(V.VideoError, match=r"even 1 frame takes 196 tokens, over data.max_video_tokens = 100"):
        V.load_video("move.mp4", str(clips), tokens_for=lambda n: 196 * n, max_video_tokens=100)
    assert [p.kind for p in V.check_video("move.mp4", str(clips), max_frame_pixels=1000)] == ["video_too_large"]


def test_video_error_keeps_its_kind_across_processes():
    import pickle

    e = pickle.loads(pickle.dumps(V.VideoError("x", "video_too_long")))
    assert (str(e), e.kind) == ("x", "video_too_long")


# --- sampling and budget ---------------------------------------------------------------------------------------

def test_sample_indices_exact():
    info = V.VideoInfo(300, 30.0, 10.0, 64, 64)
    assert V.sample_indices(info, 8) == [0, 42, 85, 128, 170, 213, 256, 299]  # floor(linspace(0, 299, 8))
    assert V.sample_indices(V.VideoInfo(5, 30.0, 1 / 6, 8, 8), 8) == [0, 1, 2, 3, 4]  # fewer frames than asked
    assert V.sample_indices(info, 32, fps=2) == list(range(0, 300, 15))  # every 15th: 20 frames <= 32
    assert V.sample_indices(info, 8, fps=2) == [0, 42, 85, 128, 170, 213, 256, 299]  # 20 > 8: uniform
    assert V.sample_indices(info, 8, fps=0.5) == [0, 60, 120, 180, 240]  # every 60th
    assert V.sample_indices(V.VideoInfo(10, 30.0, 1 / 3, 8, 8), 4, fps=60) == [0, 3, 6, 9]  # step max(1, 0)
    assert V.timestamps(info, [0, 42, 299]) == [0.0, 1.4, 299 / 30]


def test_frames_for_budget_lowers_the_count():
    assert V.frames_for_budget(8, lambda n: 10 * n + 1, 75) == 7
    assert V.frames_for_budget(8, lambda n: 10 * n + 1, 81) == 8
    assert V.frames_for_budget(8, lambda n: 10 * n + 1, None) == 8
    assert V.frames_for_budget(8, None, 5) == 8
    assert V.frames_for_budget(16, lambda n: 4 * ((n + 1) // 2), 16) == 8  # frames merged in pairs
    with pytest.raises(V.VideoError, match="even 1 frame takes 11 tokens, over data.max_video_tokens = 10") as e:
        V.frames_for_budget(8, lambda n: 10 * n + 1, 10)
    assert e.value.kind == "video_too_long"


# --- decoding --------------------------------------------------------------------------------------------------

def test_decoded_frames_are_the_sampled_ones_in_order(clips):
    v = V.load_video("move.mp4", str(clips), max_frames=6, tokens_for=lambda n: 100 * n, max_video_tokens=500)
    assert v.indices == [0, 2, 5, 8, 11]  # 6 asked, 5 fit the budget: floor(linspace(0, 11, 5))
    assert len(v.frames) == 5 and all(f.mode == "RGB" and f.size == (32, 32) for f in v.frames)


def test_frame_content_follows_time(clips):
    v = V.load_video("move.mp4", str(clips), max_frames=5)
    assert v.indices == [0, 2, 5, 8, 11]
    assert [square_x(f) for f in v.frames] == [0, 4, 10, 16, 22]  # x = 2 * index
    assert v.timestamps == [0.0, 0.25, 0.625, 1.0, 1.375] and v.duration == 1.5
    assert os.path.samefile(v.source, clips / "move.mp4")
    w = V.load_video("move.mkv", str(clips), max_frames=12)  # estimated frame count, all frames
    assert [square_x(f) for f in w.frames] == [2 * i for i in range(12)]


@pytest.mark.parametrize("seek_gap", [0, 7, 64, 10_000])
def test_seeking_and_forward_decoding_give_the_same_frames(clips, seek_gap):
    """Frame i is grey level i; keyframes every 10 frames. Seeks land on a keyframe and decode forward."""
    wanted = [0, 3, 57, 58, 120, 121, 121, 199]
    c, stats = V._open(str(clips / "index.mp4")), {}
    try:
        frames = V._decode_indices(c, wanted, 25.0, None, "index.mp4", seek_gap, stats)
    finally:
        c.close()
    levels = [int(np.asarray(f.to_image())[16, 16, 0]) for f in frames]
    assert all(abs(level - i) <= 1 for level, i in zip(levels, wanted)), levels
    # 10_000: one forward pass over all 200 frames; 64: one seek (121 -> 199); 7: three (3 -> 57 -> 120 -> 199)
    assert stats == {10_000: {"decoded": 200, "seeks": 0}, 64: {"decoded": 132, "seeks": 1},
                     7: {"decoded": 25, "seeks": 3}, 0: {"decoded": 35, "seeks": 7}}[seek_gap]


def test_a_stream_shorter_than_its_header_repeats_its_last_frame(clips):
    c = V._open(str(clips / "move.mp4"))
    try:
        frames = V._decode_indices(c, [0, 11, 13, 20], 8.0, None, "move.mp4")
    finally:
        c.close()
    assert [square_x(f.to_image()) for f in frames] == [0, 22, 22, 22]  # the header said 21+ frames


def test_time_instruction_is_llava_videos(clips):
    v = V.Video(frames=[None] * 3, timestamps=[0.0, 0.625, 1.375], duration=1.5)
    assert V.time_instruction(v) == (
        "The video lasts for 1.50 seconds, and 3 frames are uniformly sampled from it. These frames are located "
        "at 0.00s,0.62s,1.38s.Please answer the following questions related to this video.")


# --- frame folders ---------------------------------------------------------------------------------------------

def _frames_folder(root, names=("frame_1.png", "frame_2.png", "frame_10.png", "frame_3.jpg")) -> None:
    (root / "clip").mkdir(parents=True)
    for k, name in enumerate(names):
        x = int(name.split("_")[1].split(".")[0])
        Image.fromarray(D.draw(32, [("red", "square", 2 * x, 4, 6)])).save(root / "clip" / name)
    (root / "clip" / "notes.txt").write_text("not a frame")
    (root / "clip" / "sub").mkdir()


def test_frame_folder_is_a_video(tmp_path):
    _frames_folder(tmp_path)
    names = [os.path.basename(p) for p in V.frame_files(str(tmp_path / "clip"))]
    assert names == ["frame_1.png", "frame_2.png", "frame_3.jpg", "frame_10.png"]  # natural order, images only
    assert V.probe(str(tmp_path / "clip"), frames_fps=2.0) == V.VideoInfo(4, 2.0, 2.0, 32, 32)
    v = V.load_video("clip", str(tmp_path), max_frames=3, frames_fps=2.0)
    assert v.indices == [0, 1, 3] and v.timestamps == [0.0, 0.5, 1.5] and v.duration == 2.0
    assert [square_x(f) for f in v.frames] == [2, 4, 20]
    with pytest.raises(V.VideoError, match="512x512|over the limit") as e:
        big = tmp_path / "big"
        big.mkdir()
        Image.new("RGB", (512, 512)).save(big / "0.png")
        V.load_video("big", str(tmp_path), max_frame_pixels=1000)
    assert e.value.kind == "video_too_large"


def test_frame_folder_and_paths_stay_inside_the_folder(tmp_path):
    _frames_folder(tmp_path / "data")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, tmp_path / "data" / "clip" / "frame_4.png")
    with pytest.raises(V.VideoError, match="symlink to .*secret.png, outside the folder") as e:
        V.load_video("clip", str(tmp_path / "data"))
    assert e.value.kind == "video_outside_folder"
    assert len(V.load_video("clip", str(tmp_path / "data"), allow_outside=True).frames) == 5
    D.write_mp4(tmp_path / "out.mp4", moving_square(4))
    os.symlink(tmp_path / "out.mp4", tmp_path / "data" / "link.mp4")
    for rel in ("../out.mp4", str(tmp_path / "out.mp4"), "link.mp4"):
        assert _kind(V.load_video, rel, str(tmp_path / "data")) == "video_outside_folder", rel
        assert [p.kind for p in V.check_video(rel, str(tmp_path / "data"))] == ["video_outside_folder"]


# --- workers ---------------------------------------------------------------------------------------------------

class _Clips(Dataset):
    def __init__(self, folder, names):
        self.folder, self.names = folder, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        v = V.load_video(self.names[i], self.folder, max_frames=4)
        return torch.from_numpy(V.video_tensor(v))  # [T, H, W, 3]


def test_dataloader_workers_decode(clips):
    torch.set_num_threads(1)
    ds = _Clips(str(clips), ["move.mp4", "move.mkv", "index.mp4", "move.mp4"])
    out = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert [tuple(t.shape) for t in out] == [(4, 32, 32, 3)] * 4
    assert torch.equal(out[0], out[3])
    bad = _Clips(str(clips), ["missing.mp4"])
    with pytest.raises(V.VideoError, match="video not found"):
        list(DataLoader(bad, batch_size=None, num_workers=1))


# --- config ----------------------------------------------------------------------------------------------------

def test_video_config_keys():
    d = from_dict(DataConfig, {"max_frames": 16, "fps": 1, "max_video_tokens": 4096, "video_time_prompt": True,
                               "frames_fps": 2, "max_video_seconds": 600}, "data")
    assert (d.max_frames, d.fps, d.max_video_tokens, d.video_time_prompt, d.frames_fps) == (16, 1, 4096, True, 2)
    assert DataConfig().max_frame_pixels == V.MAX_FRAME_PIXELS and DataConfig().video_folder == ""
    for bad, msg in [({"max_frames": 0}, "data.max_frames must be an integer >= 1"),
                     ({"fps": 0}, "data.fps must be a number > 0 or null"),
                     ({"frames_fps": None}, "data.frames_fps must be a number > 0, got None"),
                     ({"max_video_tokens": -1}, "data.max_video_tokens must be an integer >= 0 or null"),
                     ({"video_time_prompt": "yes"}, "data.video_time_prompt must be true or false")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, bad, "data")


# --- the demo --------------------------------------------------------------------------------------------------

def test_video_demo_data(tmp_path):
    paths = D.make_video_demo(tmp_path, n_train=8, n_eval=8, size=32, n_frames=8, seed=3)
    assert sorted(paths) == ["eval", "eval_one", "eval_shuffled", "train"]
    train, ev = json.load(open(paths["train"])), json.load(open(paths["eval"]))
    assert len(train) == 8 and [r["type"] for r in ev] == list(D.QUESTION_TYPES) * 2
    rec = train[0]
    assert rec["video"] == "clips/000000.mp4" and rec["conversations"][0]["value"].startswith("<video>\n")
    again = D.make_video_demo(tmp_path / "again", n_train=8, n_eval=8, size=32, n_frames=8, seed=3)
    assert json.load(open(again["eval_one"])) == json.load(open(paths["eval_one"]))  # deterministic
    for split in ("eval", "eval_shuffled", "eval_one"):
        for r in json.load(open(paths[split])):
            assert V.probe(str(tmp_path / r["video"])).n_frames == 8
    # the answer of a direction question is in the decoded frames, in order
    for r in ev:
        if r["type"] == "horizontal":
            x = [square_x_any(f) for f in V.load_video(r["video"], str(tmp_path), max_frames=8).frames]
            assert (x[-1] > x[0]) == (r["conversations"][1]["value"] == "right"), x


def square_x_any(frame) -> int:
    a = np.asarray(frame).astype(int)
    return int(np.nonzero((a.sum(axis=2) < 600).any(axis=0))[0][0])  # leftmost non-white column


def test_demo_bounce_paths_and_eval_variants():
    """Bounce paths reverse exactly as many times as the answer says; the variants keep the frames, not the order."""
    rng = random.Random(0)
    for _ in range(50):
        path = D.bounce_path(rng, 26, 8, target := rng.randrange(3))
        steps = np.diff(path)
        assert np.all(steps != 0) and int(np.sum(np.sign(steps[1:]) != np.sign(steps[:-1]))) == target
    frames, q, a = D.clip_move(random.Random(1), 32, 8, "vertical")
    assert q.endswith("move up or down? Answer with one word.") and a in ("up", "down")
    one = D.variant_frames(frames, "one", random.Random(0))
    assert len(one) == 8 and all(f is one[0] for f in one)
    shuffled = D.variant_frames(frames, "shuffled", random.Random(0))
    assert sorted(f.tobytes() for f in shuffled) == sorted(f.tobytes() for f in frames)
    assert [f.tobytes() for f in shuffled] != [f.tobytes() for f in frames]
