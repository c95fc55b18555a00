"""`vlmkit chat --video` / `/video PATH` and `vlmkit eval` on video questions, with a tiny saved video model."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from test_video_dataset import SAMPLES, write_media
from test_video_model import cached
from vlmkit import VLM
from vlmkit.chat import ASSISTANT, COMMANDS, ChatSession
from vlmkit.cli import main
from vlmkit.data.dataset import VideoOptions
from vlmkit.data.video import load_video
from vlmkit.evaluate import evaluate

GEN = {"do_sample": False, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def saved(tok_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("vchat")
    write_media(d)
    cached(tok_dir).save_pretrained(d / "model")
    return d, VLM.from_pretrained(d / "model").eval()


def reference(model, text: str, clip: str, n: int) -> str:
    """The greedy answer to `<video>\\n{text}` about `clip` sampled at n frames, made by hand."""
    proc = model.processor()
    video = load_video(clip, max_frames=n, allow_outside=True)
    p = proc([{"role": "user", "content": f"<video>\n{text}"}], [], add_generation_prompt=True, videos=[video])
    with torch.no_grad():
        out = model.generate(p["input_ids"][None], None, p["pixel_values"], pixel_values_videos=p["pixel_values_videos"],
                             frames_per_video=p["frames_per_video"], **GEN)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_video_command_attaches_to_the_next_question(saved):
    d, model = saved
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(model, GEN, out, err, video=VideoOptions(max_frames=3))
    assert "/video PATH" in COMMANDS
    s.handle(f"/video {d / 'nope.mp4'}")
    assert err.getvalue() == f"error: video not found: {d / 'nope.mp4'}\n"
    s.handle(f"/video {d / 'clip.mp4'}")
    assert f"(video {d / 'clip.mp4'}: 3 frames attached to the next question)" in out.getvalue()
    reply = s.answer("Where does it go?")
    assert reply == reference(model, "Where does it go?", str(d / "clip.mp4"), 3)
    assert s.history[0]["content"] == "<video>\nWhere does it go?" and len(s.videos) == 1
    s.answer("And then?")  # a second turn keeps the video of the first in the conversation
    assert len(s.history) == 4 and s.pending_video is None and len(s.videos) == 1
    s.clear()
    assert s.videos == [] and s.history == []
    s.handle(f"/video {d / 'frames'}")  # a folder of frames is a video too
    assert len(s.pending_video.frames) == 3


def test_video_command_on_a_model_without_video(vlm):
    err = io.StringIO()
    s = ChatSession(vlm, GEN, io.StringIO(), err)
    s.handle("/video anything.mp4")
    assert err.getvalue() == "error: this model takes no video (model.video is not set)\n"


def test_chat_cli_one_shot_and_interactive(saved, capfd, monkeypatch):
    d, model = saved
    clip = str(d / "clip.mp4")
    want = reference(model, "Where does it go?", clip, 3)
    assert main(["chat", str(d / "model"), "--video", clip, "--max-frames", "3", "--max-new-tokens", "3",
                 "--prompt", "Where does it go?"]) == 0
    assert capfd.readouterr().out.strip() == want
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {clip}\nWhere does it go?\n/exit\n"))
    assert main(["chat", str(d / "model"), "--max-frames", "3", "--max-new-tokens", "3"]) == 0
    out = capfd.readouterr().out
    assert f"(video {clip}: 3 frames attached to the next question)" in out and f"{ASSISTANT}{want}" in out


def test_eval_answers_video_questions(saved, tmp_path):
    d, model = saved
    qs = [dict(s, id=s["id"]) for s in SAMPLES]
    (d / "eval.json").write_text(json.dumps(qs))
    res = evaluate(model, str(d / "eval.json"), max_new_tokens=3, progress=False, video=VideoOptions(max_frames=3))
    assert res["n"] == 4 and [r["id"] for r in res["samples"]] == ["v", "f", "i", "t"]
    assert res["samples"][0]["answer"] == reference(model, "Where does it go?", str(d / "clip.mp4"), 3)
    # batched answers equal one-at-a-time answers (left padding with videos in the batch)
    one = evaluate(model, str(d / "eval.json"), batch_size=1, max_new_tokens=3, progress=False,
                   video=VideoOptions(max_frames=3))
    assert [r["answer"] for r in one["samples"]] == [r["answer"] for r in res["samples"]]
    assert main(["eval", str(d / "model"), "--data", str(d / "eval.json"), "--max-new-tokens", "3", "--limit", "2",
                 "--max-frames", "3", "--cpu", "--output-dir", str(tmp_path / "out")]) == 0
    rows = json.load(open(tmp_path / "out" / "eval.json"))["images"]["samples"]
    assert [(r["id"], r["answer"]) for r in rows] == [(r["id"], r["answer"]) for r in res["samples"][:2]]
