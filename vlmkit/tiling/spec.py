"""High-resolution images as several encoder tiles: one model's tiling, resolved.

`TileSpec` binds a `TilingConfig` to the encoder's tile size (its input side in pixels); each mode is one
small subclass (AnyresSpec, InternVLSpec, NaflexSpec) with split / num_tiles / num_tokens / pack. Every fact
about how an image is cut, how many tokens it becomes and how its tile features are laid out comes
from here, over the pure functions of `vlmkit.tiling`:

    data side   Processor      split(image)            -> tiles, [n_tiles, 3, T, T] once normalised
    counting    ImageTokenCounter -> num_tokens(size)   -> placeholders for `<image>` (and the merge check)
    model side  VLM            pack(tile features)     -> the image's token sequence [num_tokens, D]

Image sizes are (width, height), as PIL's `Image.size`.

Mode naflex (SigLIP 2) is one variable-size "tile" per image: `split` resizes it to its own patch grid
(`grid(size)`, (rows, cols)), the processor sends its patches, and the count is the connector's for that
grid (`ImageTokenCounter`), so each image has its own number of tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image

from ..config import LLAVA_NEXT_GRIDS, TilingConfig
from . import functions as T


@dataclass(frozen=True)
class TileSpec:
    """A tiling mode at a tile size (`tile`, the encoder's input side in pixels). Frozen and picklable
    (data-loader workers). Build one with `TileSpec.from_config`; each mode is a subclass."""

    mode: ClassVar[str]
    uses_newline: ClassVar[bool] = False
    """Whether the model needs a learned `image_newline` (anyres with unpad, as LLaVA-NeXT)."""

    tile: int

    @classmethod
    def from_config(cls, cfg: TilingConfig | None, tile: int, geometry=None, multiple: int = 1) -> TileSpec | None:
        """None for mode none (one tile per image, no tiling). naflex needs `geometry`, the encoder's
        EncoderGeometry (patch size; num_patches, the default max_num_patches), and the grid `multiple`."""
        if cfg is None or cfg.mode == "none":
            return None
        if cfg.mode == "naflex":
            return NaflexSpec.from_config(cfg, geometry, multiple)
        if cfg.mode == "anyres":
            return AnyresSpec.from_config(cfg, tile)
        return InternVLSpec(tile, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, thumbnail=cfg.thumbnail)

    @staticmethod
    def feature_side(tokens_per_tile: int) -> int:
        g = math.isqrt(tokens_per_tile)
        if g * g != tokens_per_tile:
            raise ValueError(f"anyres needs a square feature grid per tile, the connector gives {tokens_per_tile} tokens")
        return g

    def grid(self, size, n_images: int = 1) -> tuple[int, int]:
        raise NotImplementedError

    def num_tiles(self, size, n_images: int = 1) -> int:
        """Tiles an image of `size` (width, height) is cut into."""
        raise NotImplementedError

    def split(self, image: Image.Image, n_images: int = 1, fill=(0, 0, 0)) -> list[Image.Image]:
        raise NotImplementedError

    def num_tokens(self, size, tokens_per_tile: int, n_images: int = 1) -> int:
        """Placeholder count of one image: what `pack` returns for it."""
        return tokens_per_tile * self.num_tiles(size, n_images)

    def pack(self, feats: torch.Tensor, size, image_newline: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tile features [n_tiles, P, D] (in `split` order) -> its tokens [num_tokens, D]."""
        return feats.reshape(-1, feats.shape[-1])  # tiles row-major (thumbnail last)


@dataclass(frozen=True)
class AnyresSpec(TileSpec):
    """LLaVA-NeXT AnyRes: a base tile, then the best-fitting canvas cut into tiles."""

    mode: ClassVar[str] = "anyres"
    pinpoints: tuple[tuple[int, int], ...] = ()
    """anyres canvases as (height, width) pixel pairs, multiples of `tile`."""
    anyres_max: int | None = None
    unpad: bool = True

    @classmethod
    def from_config(cls, cfg: TilingConfig, tile: int) -> AnyresSpec:
        if cfg.grid_pinpoints is None:
            pins = [(r * tile, c * tile) for r, c in LLAVA_NEXT_GRIDS]
        else:
            pins = T.parse_grid_pinpoints(cfg.grid_pinpoints, tile)
        bad = [p for p in pins if p[0] % tile or p[1] % tile]
        if bad:
            raise ValueError(f"tiling.grid_pinpoints {bad} ([height, width] pixels) are not multiples of the "
                             f"encoder's tile size {tile}px")
        return cls(tile, tuple(pins), cfg.anyres_max, cfg.unpad)

    @property
    def uses_newline(self) -> bool:
        return self.unpad

    def grid(self, size, n_images: int = 1) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return T.anyres_grid(size, self.pinpoints, self.tile)

    def num_tiles(self, size, n_images: int = 1) -> int:
        rows, cols = self.grid(size)
        return 1 + rows * cols  # the base tile included

    def split(self, image: Image.Image, n_images: int = 1, fill=(0, 0, 0)) -> list[Image.Image]:
        """Base tile, then the canvas row-major (padded with `fill`, black as LLaVA-NeXT)."""
        return T.anyres_tiles(image, self.pinpoints, self.tile, fill=fill)

    def num_tokens(self, size, tokens_per_tile: int, n_images: int = 1) -> int:
        if self.unpad:
            g = self.feature_side(tokens_per_tile)
            return T.anyres_num_tokens(size, self.pinpoints, self.tile, g, self.anyres_max)
        return tokens_per_tile * self.num_tiles(size, n_images)

    def pack(self, feats: torch.Tensor, size, image_newline: torch.Tensor | None = None) -> torch.Tensor:
        if self.unpad:
            return T.pack_anyres_features(feats, size, self.pinpoints, self.tile, image_newline, self.anyres_max)
        # LLaVA-NeXT `spatial`: base tile, then the whole (rows*g) x (cols*g) grid row by row, no newline
        n, p, d = feats.shape
        g = self.feature_side(p)
        rows, cols = self.grid(size)
        if n != 1 + rows * cols:
            raise ValueError(f"expected 1 + {rows}x{cols} tiles for image size {tuple(size)} (width, height), got {n}")
        grid = feats[1:].view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(-1, d)
        return torch.cat((feats[0], grid), dim=0)


@dataclass(frozen=True)
class InternVLSpec(TileSpec):
    """InternVL dynamic tiling: the grid whose aspect ratio fits best, then a thumbnail."""

    mode: ClassVar[str] = "internvl"
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True

    def _bounds(self, n_images: int) -> tuple[int, int]:
        """(min, max) tiles of one image in a sample of `n_images` images."""
        hi = T.internvl_tile_budget(self.max_tiles, max(1, n_images))
        return min(self.min_tiles, hi), hi

    def grid(self, size, n_images: int = 1) -> tuple[int, int]:
        """(cols, rows) of tiles, as in vlmkit.tiling.functions."""
        return T.internvl_grid(size, self.tile, *self._bounds(n_images))

    def num_tiles(self, size, n_images: int = 1) -> int:
        return T.internvl_num_tiles(size, self.tile, *self._bounds(n_images), self.thumbnail)

    def split(self, image: Image.Image, n_images: int = 1, fill=(0, 0, 0)) -> list[Image.Image]:
        """Row-major tiles, then the thumbnail."""
        return T.internvl_tiles(image, self.tile, *self._bounds(n_images), self.thumbnail)


@dataclass(frozen=True)
class NaflexSpec(TileSpec):
    """SigLIP 2 NaFlex: one variable-size "tile" per image, at its own patch grid."""

    mode: ClassVar[str] = "naflex"
    patch: int = 0
    """The encoder's patch side in pixels."""
    max_num_patches: int = 0
    """At most this many patches per image."""
    multiple: int = 1
    """Both sides of every patch grid are multiples of it (the connector's `grid_multiple`)."""

    @classmethod
    def from_config(cls, cfg: TilingConfig, geometry, multiple: int = 1) -> NaflexSpec:
        """Over a NaFlex encoder's geometry; `multiple` k: grids of k x k patch blocks."""
        if geometry is None or getattr(geometry, "naflex_patches", None) is None:
            size = getattr(geometry, "image_size", None)
            raise ValueError("tiling.mode naflex needs a NaFlex SigLIP 2 encoder (name: siglip2 with a "
                             "siglip2_vision_model checkpoint, e.g. google/siglip2-base-patch16-naflex); this encoder "
                             f"takes a fixed {size}x{size} input (a fused encoder, or a model with a fixed position "
                             "table): use tiling none, anyres or internvl")
        max_patches = cfg.max_num_patches or geometry.naflex_patches
        if max_patches < multiple * multiple:
            raise ValueError(f"tiling.max_num_patches {max_patches} is below one {multiple}x{multiple} block of "
                             f"patches, the least the connector takes (grid sides must be multiples of {multiple})")
        return cls(geometry.image_size, patch=geometry.patch_size, max_num_patches=max_patches, multiple=multiple)

    def grid(self, size, n_images: int = 1) -> tuple[int, int]:
        """The image's patch grid (rows, cols) (SigLIP 2's spatial_shapes)."""
        return T.naflex_grid(size, self.patch, self.max_num_patches, self.multiple)

    def num_tiles(self, size, n_images: int = 1) -> int:
        return 1

    def split(self, image: Image.Image, n_images: int = 1, fill=(0, 0, 0)) -> list[Image.Image]:
        """The image resized to its own patch grid."""
        return [T.naflex_resize(image, self.patch, self.max_num_patches, self.multiple)]

    def num_tokens(self, size, tokens_per_tile: int, n_images: int = 1) -> int:
        """`tokens_per_tile` must be the connector's count for this image's own grid (ImageTokenCounter passes it)."""
        return tokens_per_tile
