"""`vlmkit chat`: a conversation with a model about images and videos, one-shot or interactive.

Interactive (no --prompt) reads lines from stdin: each is a question, answered with the whole conversation so far
(multi-turn), or a command:

    /image PATH   attach an image to the next question (a conversation may hold several)
    /video PATH   attach a video (file or folder of frames) to the next question (a model with model.video)
    /clear        start a new conversation (the last image stays attached to the next question)
    /help         list the commands
    /exit         quit (so do Ctrl-D / end of input)

The prompt marker is `USER> ` and each answer is printed after `ASSISTANT> `, streamed as it is generated.
A bad image path or a question the model cannot take prints one line (`error: ...`) and the session goes on.
"""
from __future__ import annotations

import sys
from typing import TextIO

USER, ASSISTANT = "USER> ", "ASSISTANT> "
COMMANDS = {
    "/image PATH": "attach an image to the next question",
    "/video PATH": "attach a video (file or folder of frames) to the next question",
    "/clear": "start a new conversation (the last image stays attached to the next question)",
    "/help": "list these commands",
    "/exit": "quit (or Ctrl-D)",
}


class ChatSession:
    """The conversation (`history`: role/content turns; `images`: the images its `<image>` placeholders stand for)
    and the image waiting for the next question (`pending`)."""

    def __init__(self, model, gen: dict, out: TextIO | None = None, err: TextIO | None = None, video=None):
        """`out` / `err`: default the streams of the moment (sys.stdout / sys.stderr); `video`: a
        `vlmkit.data.dataset.VideoOptions` (frames sampled per video, budget, limits)."""
        from .data.dataset import VideoOptions

        self.model, self.gen = model, gen
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.proc = model.processor()
        self.video = video or VideoOptions()
        self.history: list[dict] = []
        self.images: list = []
        self.videos: list = []
        self.pending = None
        self.last_image = None
        self.pending_video = None

    def attach_video(self, path: str) -> None:
        """Sample and decode `path` (a file or a folder of frames) as training does, for the next question."""
        from .data.video import VideoError, load_video

        if self.proc.video_token_id is None:
            raise VideoError("this model takes no video (model.video is not set)", "video_count_mismatch")
        o = self.video
        self.pending_video = load_video(path, o.folder, o.max_frames, o.fps,
                                        self.proc.count_image_tokens.count_video_tokens, o.max_video_tokens,
                                        o.max_frame_pixels, True, o.frames_fps, o.max_seconds)

    def attach(self, path: str) -> None:
        """Load `path` (checked as training checks images: missing, unreadable, too large) for the next question."""
        from .data.images import load_image

        self.pending = self.last_image = load_image(path)

    def clear(self) -> None:
        self.history, self.images, self.videos, self.pending_video = [], [], [], None
        self.pending = self.last_image

    def answer(self, text: str) -> str:
        """Answer `text` given the conversation so far; the turn is kept only when it was answered."""
        import torch
        from transformers import TextStreamer

        images = self.images + ([self.pending] if self.pending is not None else [])
        videos = self.videos + ([self.pending_video] if self.pending_video is not None else [])
        content = (f"{self.proc.video_token}\n" if self.pending_video is not None else "") + (
            "<image>\n" if self.pending is not None else "") + text
        turns = self.history + [{"role": "user", "content": content}]
        p = self.proc(turns, images, add_generation_prompt=True, videos=videos or None)
        streamer = TextStreamer(self.model.tokenizer, skip_special_tokens=True) if self.out is sys.stdout else None
        video = {k: p[k] for k in ("pixel_values_videos", "frames_per_video") if videos and k in p}
        with torch.no_grad():
            out = self.model.generate(p["input_ids"][None], None, p["pixel_values"], image_sizes=p["image_sizes"],
                                      tiles_per_image=p["tiles_per_image"], streamer=streamer, **video, **self.gen)
        reply = self.model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        if streamer is None:
            print(reply, file=self.out)
        self.history, self.images, self.pending = turns + [{"role": "assistant", "content": reply}], images, None
        self.videos, self.pending_video = videos, None
        return reply

    def handle(self, line: str) -> bool:
        """One line of input: a command or a question. False when the session should end."""
        text = line.strip()
        if not text:
            return True
        cmd, _, rest = text.partition(" ")
        if cmd == "/exit":
            return False
        if cmd == "/help":
            print("\n".join(f"  {k:<12} {v}" for k, v in COMMANDS.items()), file=self.out)
        elif cmd == "/clear":
            self.clear()
            print("(new conversation)", file=self.out)
        elif cmd == "/image":
            self._image(rest.strip())
        elif cmd == "/video":
            self._video(rest.strip())
        elif cmd.startswith("/") and " " not in cmd and len(cmd) > 1 and cmd[1:].isalpha():
            self._error(f"unknown command {cmd} (/help lists them)")
        else:
            print(ASSISTANT, end="", file=self.out, flush=True)
            try:
                self.answer(text)
            except (ValueError, OSError) as e:  # e.g. more images than the model takes: this question only
                print(file=self.out)
                self._error(str(e))
        return True

    def _image(self, path: str) -> None:
        if not path:
            return self._error("/image needs a path: /image PATH")
        try:
            self.attach(path)
        except OSError as e:  # ImageError is an OSError: missing, unreadable, too large
            return self._error(str(e).splitlines()[0])
        print(f"(image {path} attached to the next question)", file=self.out)

    def _video(self, path: str) -> None:
        if not path:
            return self._error("/video needs a path: /video PATH")
        try:
            self.attach_video(path)
        except OSError as e:  # VideoError: missing, corrupt, no frames, too large / long, or no video model
            return self._error(str(e).splitlines()[0])
        print(f"(video {path}: {len(self.pending_video.frames)} frames attached to the next question)", file=self.out)

    def _error(self, msg: str) -> None:
        print(f"error: {msg}", file=self.err, flush=True)

    def loop(self, lines: TextIO = sys.stdin) -> None:
        """Read lines until /exit or end of input; echo the question when the input is not a terminal, so a
        piped session's transcript reads as one."""
        echo = not (hasattr(lines, "isatty") and lines.isatty())
        print("vlmkit chat: /help lists the commands; /exit or Ctrl-D quits", file=self.err)
        while True:
            print(USER, end="", file=self.out, flush=True)
            line = lines.readline()
            if not line:  # end of input / Ctrl-D
                print(file=self.out)
                return
            if echo:
                print(line.rstrip("\n"), file=self.out)
            if not self.handle(line):
                return
