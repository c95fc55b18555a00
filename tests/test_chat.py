"""`vlmkit chat`: the interactive session (roles, /image, /clear, /help, /exit, end of input) and its transcript."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from vlmkit.chat import ASSISTANT, COMMANDS, USER, ChatSession

GEN = {"do_sample": False, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(d / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(d / "blue.png")
    (d / "bad.png").write_bytes(b"not an image")
    return d


def session(vlm):
    return ChatSession(vlm, GEN, out=io.StringIO(), err=io.StringIO())


def test_history_is_kept_and_images_attach_to_the_next_question(vlm, images):
    s = session(vlm)
    s.attach(str(images / "red.png"))
    assert s.handle("what color?") and s.handle("and the shape?")
    assert [t["role"] for t in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.history[0]["content"] == "<image>\nwhat color?" and s.history[2]["content"] == "and the shape?"
    assert len(s.images) == 1 and s.pending is None
    assert s.handle(f"/image {images / 'blue.png'}")  # a second image joins the conversation at the next question
    assert s.handle("and now?")
    assert s.history[4]["content"] == "<image>\nand now?" and len(s.images) == 2 and len(s.history) == 6
    # each answer is the greedy answer to the whole conversation up to its question
    p = s.proc(s.history[:5], s.images, add_generation_prompt=True)
    out = vlm.generate(p["input_ids"][None], None, p["pixel_values"], image_sizes=p["image_sizes"],
                       tiles_per_image=p["tiles_per_image"], **GEN)
    assert s.history[5]["content"] == vlm.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_clear_starts_over_with_the_last_image(vlm, images):
    s = session(vlm)
    s.attach(str(images / "red.png"))
    s.handle("what color?")
    s.handle("/clear")
    assert s.history == [] and s.images == [] and s.pending is not None
    s.handle("what color?")
    assert s.history[0]["content"] == "<image>\nwhat color?" and len(s.images) == 1
    assert "(new conversation)" in s.out.getvalue()


@pytest.mark.parametrize("name,msg", [("missing.png", "error: image not found: {p}"),
                                      ("bad.png", "error: cannot read image {p}: ")])
def test_bad_image_is_one_line_and_the_session_goes_on(vlm, images, name, msg):
    s = session(vlm)
    s.attach(str(images / "red.png"))
    before = s.pending
    assert s.handle(f"/image {images / name}")
    lines = s.err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(msg.format(p=images / name)), lines
    assert s.pending is before  # the previous image still stands
    assert s.handle("what color?") and len(s.history) == 2


def test_commands_help_exit_and_end_of_input(vlm):
    s = session(vlm)
    assert s.handle("/help") and all(k in s.out.getvalue() for k in COMMANDS)
    assert s.handle("/image") and s.err.getvalue() == "error: /image needs a path: /image PATH\n"
    assert s.handle("/nope") and "unknown command /nope" in s.err.getvalue()
    assert s.handle("   ") and s.history == []  # an empty line asks nothing
    assert s.handle("/exit") is False
    s = session(vlm)
    s.loop(io.StringIO("hello\n"))  # end of input ends the session after answering
    assert len(s.history) == 2 and s.out.getvalue().count(USER) == 2


def test_piped_session_transcript(vlm, images, tmp_path):
    """`vlmkit chat MODEL` with stdin piped: roles, echoed questions, one error line, clean exit at /exit."""
    vlm.save_pretrained(tmp_path / "model")
    script = ["/help", f"/image {images / 'missing.png'}", f"/image {images / 'red.png'}", "what color?",
              "and the shape?", "/clear", "what color?", "/exit", "never asked"]
    p = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", str(tmp_path / "model"), "--max-new-tokens",
                        "3"], input="\n".join(script) + "\n", capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    for line in script[:8]:  # each line read is shown after the prompt marker
        assert f"{USER}{line}\n" in out, (line, out)
    assert "never asked" not in out and out.count(USER) == 8 and out.count(ASSISTANT) == 3
    for k in COMMANDS:
        assert k in out
    assert f"(image {images / 'red.png'} attached to the next question)" in out and "(new conversation)" in out
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: image not found: {images / 'missing.png'}"], p.stderr
