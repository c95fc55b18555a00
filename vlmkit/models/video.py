"""Video frames -> tokens: each frame one encoder tile, pooled per frame, the frames of a video concatenated in
order, and the newline(s) of `model.video` (the model side of `<video>`; the counter in tiling/counter.py counts
the same tokens).

    average / max   a pool_stride x pool_stride window over the encoder's patch grid before the connector
                    (floor at the edges; LLaVA-NeXT-Video's vision_resampler)
    bilinear        the connector's output grid resized to ceil(rows / s) x ceil(cols / s), align_corners false
                    (LLaVA-OneVision's apply_pooling)
    newline frame   the newline vector after each frame's tokens; video: one after the whole video (OneVision)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import is_sharded


def as_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, R*C, D] -> [N, D, R, C] (channels first, for torch's 2D pooling and interpolation)."""
    n, p, d = x.shape
    if p != grid[0] * grid[1]:
        raise ValueError(f"video: {p} tokens per frame do not form the {grid[0]}x{grid[1]} grid (rows x cols)")
    return x.reshape(n, grid[0], grid[1], d).permute(0, 3, 1, 2)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """[N, D, R, C] -> [N, R*C, D], row-major."""
    return x.flatten(2).transpose(1, 2).contiguous()


def pool_patches(feats: torch.Tensor, grid: tuple[int, int], mode: str, stride: int) -> torch.Tensor:
    """Encoder features [N, P, C] on `grid` -> [N, floor(R/s) * floor(C/s), C] (average or max)."""
    x = as_grid(feats, grid)  # [N, C, R, C']
    pooled = F.avg_pool2d(x, stride) if mode == "average" else F.max_pool2d(x, stride)
    return from_grid(pooled)


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """Connector tokens [N, P', D] on `grid` -> [N, out rows * out cols, D], bilinear (align_corners false)."""
    x = as_grid(tokens, grid)  # [N, D, R, C]
    return from_grid(F.interpolate(x, size=tuple(out), mode="bilinear"))


def newline_vector(model) -> torch.Tensor | None:
    """The vector `newline: frame | video` appends: image_newline when the model has one (LLaVA-NeXT and
    OneVision share it between images and videos), else the model's own video_newline."""
    if model.config.video.newline == "none":
        return None
    return model.image_newline if model.image_newline is not None else model.video_newline


def encode_frames(model, frames: torch.Tensor) -> torch.Tensor:
    """[N_frames, 3, T, T] -> pooled frame tokens [N_frames, L_f, D] (L_f: the counter's frame_grid)."""
    cfg, counter = model.config.video, model.count_image_tokens
    feats = model._run_encoder(frames)  # [N, P, C]
    grid = model.encoder.grid
    if cfg.pool in ("average", "max"):
        feats = pool_patches(feats, grid, cfg.pool, cfg.pool_stride)  # [N, P/s^2, C]
        grid = counter.pooled_patch_grid()
    tokens = model.connect(feats, grid)  # [N, P', D]
    if cfg.pool == "bilinear":
        tokens = resize_tokens(tokens, counter.connector_grid(), counter.frame_grid())
    return tokens


def video_features(model, pixel_values_videos: torch.Tensor, frames_per_video) -> list[torch.Tensor]:
    """Frames of all videos [N_frames, 3, T, T] and each video's frame count -> one [L_v, D] per video."""
    counts = frames_per_video.tolist() if torch.is_tensor(frames_per_video) else list(frames_per_video)
    if sum(counts) != pixel_values_videos.shape[0] or any(n < 1 for n in counts):
        raise ValueError(f"video frame mismatch: frames_per_video {counts} (each >= 1) must add up to the "
                         f"{pixel_values_videos.shape[0]} frame(s) of pixel_values_videos")
    tokens = encode_frames(model, pixel_values_videos)  # [N_frames, L_f, D]
    vec = newline_vector(model)
    mode = model.config.video.newline
    if mode == "frame":
        nl = vec.to(tokens.dtype).expand(tokens.shape[0], 1, -1)  # [N_frames, 1, D]
        tokens = torch.cat([tokens, nl], dim=1)  # [N_frames, L_f + 1, D]
    out = [part.reshape(-1, part.shape[-1]) for part in tokens.split(counts)]  # [n_v * L, D] each
    if mode == "video":
        out = [torch.cat([v, vec.to(v.dtype)[None]]) for v in out]  # [n_v * L_f + 1, D]
    return out


def video_path_must_run(model) -> bool:
    """Training with a batch of no video on a video model: must the video path run anyway? Yes when any of its
    parameters train or are sharded (as `merge.image_path_must_run`), so every process runs the same modules the
    same number of times per step (one image path, one video path). Never in inference."""
    from .merge import image_path_must_run

    if not model.training or model.config.video is None:
        return False
    own = model.video_newline
    return image_path_must_run(model) or (own is not None and (own.requires_grad or is_sharded(own)))


def unused_video_path(model, embeds: torch.Tensor) -> torch.Tensor:
    """A zero that depends on every video-side parameter: one blank frame through encoder, pooling, connector
    and newline, times 0 (the loss is unchanged)."""
    s = model.encoder.image_size
    blank = torch.zeros(1, 3, s, s, device=embeds.device)  # [1, 3, S, S]
    used = video_features(model, blank, [1])[0].float().sum()
    return (used * 0).to(embeds.dtype)  # [] exactly 0
