"""`vlmkit chat`: a conversation with a model about images, one-shot or interactive.

Interactive (no --prompt) reads lines from stdin: each is a question, answered with the whole conversation so far
(multi-turn), or a command:

    /image PATH   attach an image to the next question (a conversation may hold several)
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
    "/clear": "start a new conversation (the last image stays attached to the next question)",
    "/help": "list these commands",
    "/exit": "quit (or Ctrl-D)",
}


class ChatSession:
    """The conversation (`history`: role/content turns; `images`: the images its `<image>` placeholders stand for)
    and the image waiting for the next question (`pending`)."""

    def __init__(self, model, gen: dict, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.model, self.gen, self.out, self.err = model, gen, out, err
        self.proc = model.processor()
        self.history: list[dict] = []
        self.images: list = []
        self.pending = None
        self.last_image = None

    def attach(self, path: str) -> None:
        """Load `path` (checked as training checks images: missing, unreadable, too large) for the next question."""
        from .data.images import load_image

        self.pending = self.last_image = load_image(path)

    def clear(self) -> None:
        self.history, self.images = [], []
        self.pending = self.last_image

    def answer(self, text: str) -> str:
        """Answer `text` given the conversation so far; the turn is kept only when it was answered."""
        import torch
        from transformers import TextStreamer

        images = self.images + ([self.pending] if self.pending is not None else [])
        content = ("<image>\n" if self.pending is not None else "") + text
        turns = self.history + [{"role": "user", "content": content}]
        p = self.proc(turns, images, add_generation_prompt=True)
        streamer = TextStreamer(self.model.tokenizer, skip_special_tokens=True) if self.out is sys.stdout else None
        with torch.no_grad():
            out = self.model.generate(p["input_ids"][None], None, p["pixel_values"], image_sizes=p["image_sizes"],
                                      tiles_per_image=p["tiles_per_image"], streamer=streamer, **self.gen)
        reply = self.model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        if streamer is None:
            print(reply, file=self.out)
        self.history, self.images, self.pending = turns + [{"role": "assistant", "content": reply}], images, None
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
