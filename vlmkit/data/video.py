"""Video files and frame folders -> a few RGB frames and their timestamps (the decoding step of video samples).

A video sample names a file (`clip.mp4`, any container PyAV / FFmpeg reads) or a folder of frames, relative to
`data.video_folder` (default: `data.image_folder`). `load_video` does, in order, without decoding a pixel until
the last step:

1. confinement: the path must lead inside the folder (no absolute path, no `..`, no symlink out), as images;
2. `probe`: frame count, rate, duration and frame size from the container / stream headers (a missing frame
   count is estimated as duration x rate); a frame over `max_frame_pixels` or a clip over `max_duration`
   seconds is refused here;
3. `frames_for_budget`: the frame count is lowered until the video's placeholder tokens
   (`tokens_for(n_frames)`, the model's `count_video_tokens`) fit `max_video_tokens`;
4. `sample_indices`: which frames, uniformly over the clip (LLaVA-NeXT / LLaVA-Video rule, below);
5. decoding of those frames only (forward decoding, a seek when the next wanted frame lies far ahead),
   converted to RGB PIL images.

Sampling rule (LLaVA-NeXT `process_video_with_decord`, llava/utils.py): with `fps` null, k = min(max_frames,
n_frames) frames at `floor(linspace(0, n_frames - 1, k))`. With `fps` set, every `max(1, round(rate / fps))`-th
frame from frame 0; when that gives more than `max_frames` frames, `floor(linspace(0, n_frames - 1, max_frames))`
instead. A frame's timestamp is `index / rate` seconds (for a frame folder, `rate` is `data.frames_fps`).

Config keys (`data.*`, vlmkit/config.py): `video_folder`, `max_frames` (8), `fps` (null), `max_video_tokens`
(null), `video_time_prompt` (false: `time_instruction` is not added), `max_frame_pixels` (4096 x 4096),
`frames_fps` (1.0), `max_video_seconds` (null).

Every failure is a `VideoError` with a `kind` check-data counts: video_missing, video_corrupt (not a video, no
video stream, undecodable), video_no_frames, video_too_large (frame pixels over the limit, from the header),
video_too_long (over the token budget even at one frame, or over max_video_seconds), video_outside_folder.
Nothing here keeps state between calls: each call opens and closes its own container (DataLoader workers).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..extras import require
from .images import ImageError, load_image, open_image
from .paths import escape

MAX_FRAME_PIXELS = 4096 * 4096
"""Default limit on one frame's pixels (width x height from the header), checked before decoding."""
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Files of a frame folder that are frames (case-insensitive); other files and sub-folders are ignored."""
SEEK_GAP = 64
"""Decoding seeks (to the keyframe before the wanted frame) only when the next wanted frame is more than this
many frames ahead of the decoder; nearer frames are reached by decoding forward."""
DECODE_THREADS = 1
"""FFmpeg decoding threads per video: one, since DataLoader workers already decode in parallel (one per core)."""
KINDS = ("video_missing", "video_corrupt", "video_no_frames", "video_too_large", "video_too_long",
         "video_outside_folder")


class VideoError(OSError):
    """A video that cannot be used; `kind` is one of KINDS."""

    def __init__(self, message: str, kind: str = "video_corrupt"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes (data-loader workers)
        return type(self), (str(self), self.kind)


@dataclass
class VideoInfo:
    """What the headers say: frame count (estimated when `estimated`), frames per second, seconds, frame size."""

    n_frames: int
    fps: float
    duration: float
    width: int
    height: int
    estimated: bool = False


@dataclass
class Video:
    """Decoded frames (RGB PIL images, in time order), their timestamps in seconds, the clip's duration."""

    frames: list = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    duration: float = 0.0
    source: str = ""
    indices: list[int] = field(default_factory=list)


def _av():
    return require("av", "video", "reading videos")


# --- paths -----------------------------------------------------------------------------------------------------

def confined_video_path(folder: str, rel: str, allow_outside: bool = False) -> str:
    """`rel` joined to `folder`; VideoError video_outside_folder when it leads outside (an absolute path, `..`
    climbing out, or a symlink to elsewhere), unless `allow_outside` (the semantics of dataset.confined_path)."""
    path, base, why = escape(folder, rel)
    if allow_outside or why is None:
        return path
    raise VideoError(f"video path {rel!r} leads outside the video folder {base} ({why}); refused. Set "
                     f"data.allow_absolute_image_paths: true if your data keeps its videos elsewhere",
                     "video_outside_folder")


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def frame_files(folder: str, allow_outside: bool = False) -> list[str]:
    """The frames of a frame folder: its image files (FRAME_EXTENSIONS), in natural order (frame_2 before
    frame_10). A file that is a symlink leading outside the folder is refused (VideoError video_outside_folder)."""
    base = os.path.realpath(folder)
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
    out = []
    for n in names:
        path = os.path.join(folder, n)
        real = os.path.realpath(path)
        if not allow_outside and os.path.commonpath([base, real]) != base:
            raise VideoError(f"frame {n!r} of {folder} is a symlink to {real}, outside the folder; refused",
                             "video_outside_folder")
        if os.path.isfile(path):
            out.append(path)
    return out


# --- headers ---------------------------------------------------------------------------------------------------

def _open(path: str):
    av = _av()
    if not os.path.exists(path):
        raise VideoError(f"video not found: {path}", "video_missing")
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # FFmpeg's InvalidDataError and friends: not a video we can read
        raise VideoError(f"cannot read video {path}: {e}", "video_corrupt") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream", "video_corrupt")
    return container


def _stream_info(container, path: str) -> VideoInfo:
    s = container.streams.video[0]
    rate = s.average_rate or s.guessed_rate or s.base_rate
    fps = float(rate) if rate else 0.0
    width, height = s.codec_context.width, s.codec_context.height
    duration = float(s.duration * s.time_base) if s.duration and s.time_base else 0.0
    if not duration and container.duration:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    n, estimated = int(s.frames or 0), False
    if n <= 0 and duration > 0 and fps > 0:
        n, estimated = int(round(duration * fps)), True
    if fps <= 0 and n > 0 and duration > 0:
        fps = n / duration
    if not duration and n and fps:
        duration = n / fps
    if width < 1 or height < 1:
        raise VideoError(f"video {path} declares a frame size of {width}x{height}", "video_corrupt")
    return VideoInfo(n, fps or 1.0, duration, width, height, estimated)


def _folder_info(folder: str, frames_fps: float, allow_outside: bool = False) -> tuple[VideoInfo, list[str]]:
    files = frame_files(folder, allow_outside)
    if not files:
        raise VideoError(f"frame folder {folder} holds no image files ({', '.join(FRAME_EXTENSIONS)})",
                         "video_no_frames")
    try:
        with open_image(files[0], None) as im:  # the header only; every frame's size is checked on load
            w, h = im.size
    except ImageError as e:
        raise VideoError(f"frame folder {folder}: {e}", "video_corrupt") from None
    return VideoInfo(len(files), frames_fps, len(files) / frames_fps, w, h), files


def probe(path: str, frames_fps: float = 1.0) -> VideoInfo:
    """The headers' numbers of a video file or frame folder (frames_fps: the rate of a frame folder); no pixel is
    decoded. Raises VideoError video_missing / video_corrupt / video_no_frames."""
    if os.path.isdir(path):
        return _folder_info(path, frames_fps)[0]
    container = _open(path)
    try:
        info = _stream_info(container, path)
    finally:
        container.close()
    if info.n_frames <= 0:
        raise VideoError(f"video {path} holds no frames (header: {info.n_frames} frames, {info.duration:g} s)",
                         "video_no_frames")
    return info


def check_limits(info: VideoInfo, name: str, max_frame_pixels: int | None = MAX_FRAME_PIXELS,
                 max_duration: float | None = None) -> None:
    """Refuse from the header: frames over `max_frame_pixels` (video_too_large), a clip over `max_duration`
    seconds (video_too_long)."""
    pixels = info.width * info.height
    if max_frame_pixels and pixels > max_frame_pixels:
        raise VideoError(f"video {name} declares {info.width}x{info.height} = {pixels:,} pixels per frame, over "
                         f"the limit of {max_frame_pixels:,}; refused before decoding. Raise "
                         f"data.max_frame_pixels to accept it", "video_too_large")
    if max_duration and info.duration > max_duration:
        raise VideoError(f"video {name} lasts {info.duration:.2f} s, over data.max_video_seconds = "
                         f"{max_duration:g}", "video_too_long")


# --- which frames ----------------------------------------------------------------------------------------------

def sample_indices(info: VideoInfo, max_frames: int, fps: float | None = None) -> list[int]:
    """Frame indices to decode, uniformly over the clip (the module docstring gives the exact rule)."""
    n = info.n_frames
    if n <= 0 or max_frames < 1:
        return []
    if fps:
        step = max(1, round(info.fps / fps))
        idx = list(range(0, n, step))
        if len(idx) <= max_frames:
            return idx
    k = min(max_frames, n)
    return np.linspace(0, n - 1, k).astype(int).tolist()  # floor, as LLaVA-NeXT's dtype=int


def timestamps(info: VideoInfo, indices: list[int]) -> list[float]:
    """Seconds of each frame index at the clip's rate."""
    return [i / info.fps for i in indices]


def frames_for_budget(max_frames: int, tokens_for: Callable[[int], int] | None,
                      max_video_tokens: int | None, name: str = "video") -> int:
    """The most frames (<= max_frames) whose placeholder count `tokens_for(n)` fits `max_video_tokens`
    (tokens_for non-decreasing in n). No budget: max_frames. VideoError video_too_long when one frame is over."""
    if not max_video_tokens or tokens_for is None:
        return max_frames
    n = max_frames
    while n >= 1 and tokens_for(n) > max_video_tokens:
        n -= 1
    if n < 1:
        raise VideoError(f"{name}: even 1 frame takes {tokens_for(1):,} tokens, over data.max_video_tokens = "
                         f"{max_video_tokens:,}", "video_too_long")
    return n


# --- decoding --------------------------------------------------------------------------------------------------

def _decode_indices(container, wanted: list[int], fps: float, max_frame_pixels: int | None, name: str,
                    seek_gap: int | None = None, stats: dict | None = None) -> list:
    """The frames at `wanted` (sorted, may repeat), as av.VideoFrame, in one forward pass with a seek (to the
    keyframe at or before the target) when the next wanted frame is more than `seek_gap` frames ahead; at most one
    seek per wanted frame, so at most sum(target + 1 for each seek) + max(wanted) + 1 frames are decoded (a stream
    whose timestamps never reach a target is refused). A stream that ends early repeats its last frame.
    `stats`, when given, receives the counts of frames decoded and seeks made."""
    seek_gap = SEEK_GAP if seek_gap is None else seek_gap
    s = container.streams.video[0]
    start = float(s.start_time * s.time_base) if s.start_time is not None and s.time_base else 0.0
    targets = sorted(set(wanted))
    got: dict[int, object] = {}
    budget, decoded, pos, t, last = targets[-1] + 1, 0, -1, 0, None
    frames, sought, timed, seeks = container.decode(s), -1, True, 0
    while t < len(targets):
        target = targets[t]
        if timed and s.time_base and target - pos > seek_gap and sought != target:
            try:
                container.seek(int((target / fps + start) / s.time_base), stream=s, backward=True)
                frames, budget, seeks = container.decode(s), budget + target + 1, seeks + 1
            except Exception:  # a stream that cannot seek: decode forward
                timed = False
            sought = target
        try:
            frame = next(frames)
        except StopIteration:
            break
        except Exception as e:
            raise VideoError(f"video {name}: frame decoding failed: {e}", "video_corrupt") from None
        decoded += 1
        if decoded > budget:
            raise VideoError(f"video {name}: {decoded} frames decoded without reaching frame {target} "
                             f"(broken timestamps?)", "video_corrupt")
        if max_frame_pixels and frame.width * frame.height > max_frame_pixels:
            raise VideoError(f"video {name}: a frame of {frame.width}x{frame.height} is over the limit of "
                             f"{max_frame_pixels:,} pixels (the header said less)", "video_too_large")
        timed = timed and frame.time is not None
        pos = int(round((frame.time - start) * fps)) if timed else pos + 1
        last = frame
        while t < len(targets) and pos >= targets[t]:
            got[targets[t]] = frame
            t += 1
    if stats is not None:
        stats.update(decoded=decoded, seeks=seeks)
    if last is None:
        raise VideoError(f"video {name}: no frame could be decoded", "video_no_frames")
    return [got.get(i, last) for i in wanted]


def _decode_file(path: str, info: VideoInfo, wanted: list[int], max_frame_pixels, name: str) -> list:
    container = _open(path)
    try:
        container.streams.video[0].codec_context.thread_count = DECODE_THREADS
        frames = _decode_indices(container, wanted, info.fps, max_frame_pixels, name)
        return [f.to_image() for f in frames]  # RGB24
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"video {name}: decoding failed: {e}", "video_corrupt") from None
    finally:
        container.close()


def _load_frames(files: list[str], wanted: list[int], max_frame_pixels, name: str) -> list:
    out = []
    for i in wanted:
        try:
            out.append(load_image(files[i], max_frame_pixels, f"{name} frame {os.path.basename(files[i])}"))
        except ImageError as e:
            kind = "video_too_large" if e.kind == "image_too_large" else "video_corrupt"
            raise VideoError(str(e), kind) from None
    return out


def load_video(path: str, folder: str = "", max_frames: int = 8, fps: float | None = None,
               tokens_for: Callable[[int], int] | None = None, max_video_tokens: int | None = None,
               max_frame_pixels: int | None = MAX_FRAME_PIXELS, allow_outside: bool = False,
               frames_fps: float = 1.0, max_duration: float | None = None) -> Video:
    """The sampled frames of a video file or frame folder `path` (relative to `folder`), decoded to RGB.

    Confinement, headers, limits and the token budget are checked before any pixel is decoded; only the sampled
    frames are decoded (module docstring). Raises VideoError with its kind."""
    full = confined_video_path(folder, path, allow_outside)
    name = path
    if os.path.isdir(full):
        info, files = _folder_info(full, frames_fps, allow_outside)
    else:
        info, files = probe(full), None
    check_limits(info, name, max_frame_pixels, max_duration)
    k = frames_for_budget(max_frames, tokens_for, max_video_tokens, f"video {name}")
    idx = sample_indices(info, k, fps)
    if files is not None:
        frames = _load_frames(files, idx, max_frame_pixels, name)
    else:
        frames = _decode_file(full, info, idx, max_frame_pixels, name)
    return Video(frames, timestamps(info, idx), info.duration, full, idx)


def time_instruction(video: Video) -> str:
    """LLaVA-Video's time prompt (same wording and number format as LLaVA-NeXT llava/train/train.py,
    `add_time_instruction`; the missing space before "Please" is theirs, kept so trained models see their text).
    LLaVA-NeXT puts it between the video token and the question: `<video>\\n{this}\\n{question}`."""
    at = ",".join(f"{t:.2f}s" for t in video.timestamps)
    return (f"The video lasts for {video.duration:.2f} seconds, and {len(video.frames)} frames are uniformly "
            f"sampled from it. These frames are located at {at}.Please answer the following questions related "
            f"to this video.")


# --- check-data ------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    kind: str
    message: str


def check_video(path: str, folder: str = "", max_frames: int = 8, fps: float | None = None,
                tokens_for: Callable[[int], int] | None = None, max_video_tokens: int | None = None,
                max_frame_pixels: int | None = MAX_FRAME_PIXELS, allow_outside: bool = False,
                frames_fps: float = 1.0, max_duration: float | None = None) -> list[Problem]:
    """What check-data reports for one video: [] when training would accept it, else its problem with the kind.
    Checks the path, headers, limits and budget, then decodes the first sampled frame only (a file whose
    headers parse but whose frames do not is video_corrupt)."""
    try:
        full = confined_video_path(folder, path, allow_outside)
        if os.path.isdir(full):
            info, files = _folder_info(full, frames_fps, allow_outside)
        else:
            info, files = probe(full), None
        check_limits(info, path, max_frame_pixels, max_duration)
        k = frames_for_budget(max_frames, tokens_for, max_video_tokens, f"video {path}")
        first = sample_indices(info, k, fps)[:1]
        if files is not None:
            _load_frames(files, first, max_frame_pixels, path)
        else:
            _decode_file(full, info, first, max_frame_pixels, path)
    except VideoError as e:
        return [Problem(e.kind, str(e))]
    return []


def video_tensor(video: Video) -> np.ndarray:
    """The frames as one uint8 array [T, H, W, 3] (all frames share the first one's size)."""
    return np.stack([np.asarray(f.convert("RGB") if f.mode != "RGB" else f) for f in video.frames])


__all__ = ["Video", "VideoInfo", "VideoError", "Problem", "KINDS", "MAX_FRAME_PIXELS", "probe", "check_limits",
           "sample_indices", "timestamps", "frames_for_budget", "load_video", "time_instruction", "check_video",
           "frame_files", "confined_video_path", "video_tensor"]
