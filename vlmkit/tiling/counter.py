"""The one place that counts image and video tokens: (width, height) of an image -> placeholders it becomes;
the frame count of a video -> its placeholders (`count_video_tokens`).

The data side expands `<image>` / `<video>` with it; the model side checks the merge with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConnectorConfig
from ..registry import CONNECTORS
from .spec import TileSpec


@dataclass(frozen=True)
class ImageTokenCounter:
    """The one place that counts placeholders: (width, height) of an image -> tokens it becomes.

    Used by the data side (to expand `<image>`) and the model side (to check the merge, per image).
    Without tiling every image is one tile of `tokens_per_tile`; with it the count comes from the
    TileSpec (AnyRes: tiling.anyres_num_tokens; InternVL: tiles x tokens per tile, the tile budget
    depending on `n_images`, the number of images in the sample; NaFlex: the connector's count for the
    image's own patch grid). Picklable, so data-loader workers carry it.
    """

    grid: tuple[int, int]
    connector: str
    options: tuple = ()
    tiling: TileSpec | None = None
    video: tuple | None = None
    """(pool, pool_stride, newline) of model.video; None: the model takes no video."""

    @property
    def tokens_per_tile(self) -> int:
        """Tokens of one tile at the encoder's own grid (naflex: of a square image at its native size)."""
        return self.tokens_for_grid(self.grid)

    def tokens_for_grid(self, grid: tuple[int, int]) -> int:
        """Tokens the connector makes of a (rows, cols) patch grid."""
        return CONNECTORS.get(self.connector).num_tokens(tuple(grid), **dict(self.options))

    def __call__(self, width: int, height: int, n_images: int = 1) -> int:
        if self.tiling is None:
            return self.tokens_per_tile
        if self.tiling.mode == "naflex":  # each image its own patch grid
            return self.tiling.num_tokens((width, height), self.tokens_for_grid(self.tiling.grid((width, height))))
        return self.tiling.num_tokens((width, height), self.tokens_per_tile, n_images)

    def per_image(self, n_tiles: int, image_sizes=None, images_per_sample=None) -> list[int]:
        """Tokens of each image of a collated batch: `n_tiles` tiles (no tiling: one per image), `image_sizes`
        and `images_per_sample` as `image_layout` takes them."""
        if self.tiling is None:
            return [self.tokens_per_tile] * n_tiles
        sizes, n_of = image_layout(image_sizes if n_tiles else [], images_per_sample)
        return [self(w, h, n) for (w, h), n in zip(sizes, n_of)]

    # ---- video: each frame one tile at the encoder's grid, pooled, then the newline(s) ----------------
    def frame_grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame's tokens after pooling. average / max pool the encoder's patch grid before
        the connector (floor, as torch's AvgPool2d / MaxPool2d); bilinear resizes the connector's output grid to
        the ceiling of each side over the stride (LLaVA-OneVision); none: the connector's own grid (or, for a
        connector that keeps none, its token count as one row)."""
        pool, stride, _ = self._video()
        if pool in ("average", "max"):
            grid = self.pooled_patch_grid()
            conn = CONNECTORS.get(self.connector)
            if hasattr(conn, "out_grid"):
                return tuple(conn.out_grid(grid, **dict(self.options)))
            return 1, self.tokens_for_grid(grid)
        grid = self.connector_grid()
        if pool == "bilinear":
            return -(-grid[0] // stride), -(-grid[1] // stride)
        return grid

    def pooled_patch_grid(self) -> tuple[int, int]:
        """The encoder's patch grid after average / max pooling (the connector's input for a video frame)."""
        _, stride, _ = self._video()
        rows, cols = self.grid
        if rows < stride or cols < stride:
            raise ValueError(f"video.pool_stride {stride} is larger than the encoder's {rows}x{cols} patch grid")
        return rows // stride, cols // stride

    def connector_grid(self) -> tuple[int, int]:
        """(rows, cols) of the connector's output for one tile; a connector that keeps no grid (qformer,
        perceiver_resampler) gives its tokens as one row, and cannot be pooled bilinearly."""
        conn = CONNECTORS.get(self.connector)
        if hasattr(conn, "out_grid"):
            return tuple(conn.out_grid(self.grid, **dict(self.options)))
        if self.video is not None and self.video[0] == "bilinear":
            raise ValueError(f"video.pool bilinear resizes the connector's output grid, but connector "
                             f"{self.connector!r} keeps no grid: use pool none, average or max")
        return 1, self.tokens_per_tile

    def count_video_tokens(self, n_frames: int) -> int:
        """Placeholders of a video of `n_frames` frames: each frame's pooled grid, plus the newline(s)."""
        _, _, newline = self._video()
        if not isinstance(n_frames, int) or n_frames < 1:
            raise ValueError(f"a video needs at least one frame, got {n_frames!r}")
        rows, cols = self.frame_grid()
        extra = {"none": 0, "frame": n_frames, "video": 1}[newline]
        return rows * cols * n_frames + extra

    def _video(self) -> tuple:
        if self.video is None:
            raise ValueError("this model takes no video (model.video is not set)")
        return self.video

    def num_tiles(self, width: int, height: int, n_images: int = 1) -> int:
        return 1 if self.tiling is None else self.tiling.num_tiles((width, height), n_images)

    @classmethod
    def for_config(cls, grid: tuple[int, int], connector: ConnectorConfig, tiling=None,
                   tile: int | None = None, geometry=None, video=None) -> ImageTokenCounter:
        """`tiling`: a TilingConfig (needs `tile`, the encoder's input side; naflex: `geometry`, the encoder's
        EncoderGeometry) or a TileSpec; None: no tiling. naflex grids are rounded to the connector's
        `grid_multiple` (pixel_shuffle: k x k blocks). `video`: a VideoConfig (model.video) or None."""
        if tiling is not None and not isinstance(tiling, TileSpec):
            conn = CONNECTORS.get(connector.name)
            multiple = conn.grid_multiple(**connector.options) if hasattr(conn, "grid_multiple") else 1
            tiling = TileSpec.from_config(tiling, tile, geometry, multiple)
        video = None if video is None else (video.pool, video.pool_stride, video.newline)
        if tiling is not None and video is not None and tiling.mode == "naflex":
            raise ValueError("model.video with naflex tiling: frames are fixed-size tiles, naflex encoders take "
                             "patch sequences; use an encoder with a fixed input size for video")
        counter = cls(tuple(grid), connector.name, tuple(sorted(connector.options.items())), tiling, video)
        tokens = counter.tokens_per_tile  # a connector that cannot take this grid says so now
        if video is not None:
            counter.count_video_tokens(1)  # a pooling that cannot apply says so now
        if tiling is not None and tiling.mode == "anyres":
            TileSpec.feature_side(tokens)  # a clear error now, not at the first image
        return counter


def image_layout(image_sizes, images_per_sample=None) -> tuple[list[tuple[int, int]], list[int]]:
    """Collated `image_sizes` [N, 2] (width, height) and `images_per_sample` [B] (default: all in one sample)
    -> each image's (width, height) and the number of images in its sample (InternVL's tile budget)."""
    sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                 else image_sizes)]
    per_sample = (images_per_sample.tolist() if torch.is_tensor(images_per_sample)
                  else list(images_per_sample) if images_per_sample is not None else [len(sizes)])
    if sum(per_sample) != len(sizes):
        raise ValueError(f"images_per_sample {per_sample} does not add up to the {len(sizes)} image size(s)")
    return sizes, [n for n in per_sample for _ in range(n)]
