"""Decoded video frames per second on one CPU core: vlmkit.data.video.load_video over generated clips.

One process, `torch.set_num_threads(1)` and one FFmpeg thread (what one DataLoader worker does). Clips: the
demo's kind of content at 336x336, and a "realistic" 30 fps clip (textured, moving, 640x360, H.264 with a
keyframe every 250 frames as libx264 makes by default). For 8 / 16 / 32 sampled frames it prints the wall time
per video and the sampled frames delivered per second (RGB PIL images), with the default seek rule and with
forward decoding only (no seek). Usage: python benchmarks/video_decode.py [--frames 300] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from vlmkit.data import video as V
from vlmkit.extras import require


def write_clip(path: str, n: int, width: int, height: int, textured: bool, rate: int = 30) -> None:
    av = require("av", "video", "the video benchmark")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8) if textured else None
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23"}
        for i in range(n):
            if textured:  # a panning noise texture with a bright square crossing it
                dx, dy = (3 * i) % width, (2 * i) % height
                a = np.ascontiguousarray(base[dy:dy + height, dx:dx + width])
            else:
                a = np.full((height, width, 3), 255, np.uint8)
            x = (7 * i) % (width - 40)
            a[40:80, x:x + 40] = (220, 40, 40)
            out.mux(s.encode(V._av().VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(s.encode())


def measure(path: str, k: int, seek_gap: int, repeat: int) -> tuple[float, int]:
    """(seconds per video, frames decoded per video) for k sampled frames."""
    saved, V.SEEK_GAP = V.SEEK_GAP, seek_gap
    try:
        V.load_video(os.path.basename(path), os.path.dirname(path), max_frames=k)  # warm the file cache
        t = time.perf_counter()
        for _ in range(repeat):
            V.load_video(os.path.basename(path), os.path.dirname(path), max_frames=k)
        dt = (time.perf_counter() - t) / repeat
        c, stats = V._open(path), {}
        try:
            info = V.probe(path)
            V._decode_indices(c, V.sample_indices(info, k), info.fps, None, path, seek_gap, stats)
        finally:
            c.close()
        return dt, stats["decoded"]
    finally:
        V.SEEK_GAP = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300, help="frames per clip (30 fps)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        clips = {"demo-like 336x336": (336, 336, False), "textured 640x360": (640, 360, True)}
        print(f"{'clip':<18} {'frames':>6} {'sampled':>7} {'decoding':<8} {'decoded':>7} {'s/video':>8} "
              f"{'sampled fr/s':>12} {'decoded fr/s':>12}")
        for name, (w, h, textured) in clips.items():
            path = os.path.join(d, f"{w}x{h}.mp4")
            write_clip(path, args.frames, w, h, textured)
            for k in (8, 16, 32):
                for how, gap in (("seek", V.SEEK_GAP), ("forward", 10 ** 9)):
                    dt, decoded = measure(path, k, gap, args.repeat)
                    print(f"{name:<18} {args.frames:>6} {k:>7} {how:<8} {decoded:>7} {dt:>8.3f} {k / dt:>12.1f} "
                          f"{decoded / dt:>12.1f}")


if __name__ == "__main__":
    main()
