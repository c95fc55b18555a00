"""The one place that counts image tokens: (width, height) of an image -> placeholders it becomes.

The data side expands `<image>` with it; the model side checks the merge with it.
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

    def num_tiles(self, width: int, height: int, n_images: int = 1) -> int:
        return 1 if self.tiling is None else self.tiling.num_tiles((width, height), n_images)

    @classmethod
    def for_config(cls, grid: tuple[int, int], connector: ConnectorConfig, tiling=None,
                   tile: int | None = None, geometry=None) -> ImageTokenCounter:
        """`tiling`: a TilingConfig (needs `tile`, the encoder's input side; naflex: `geometry`, the encoder's
        EncoderGeometry) or a TileSpec; None: no tiling. naflex grids are rounded to the connector's
        `grid_multiple` (pixel_shuffle: k x k blocks)."""
        if tiling is not None and not isinstance(tiling, TileSpec):
            conn = CONNECTORS.get(connector.name)
            multiple = conn.grid_multiple(**connector.options) if hasattr(conn, "grid_multiple") else 1
            tiling = TileSpec.from_config(tiling, tile, geometry, multiple)
        counter = cls(tuple(grid), connector.name, tuple(sorted(connector.options.items())), tiling)
        tokens = counter.tokens_per_tile  # a connector that cannot take this grid says so now
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
