"""High-resolution images as several encoder tiles: one model's tiling, resolved.

`TileSpec` binds a `TilingConfig` to the encoder's tile size (its input side in pixels). Every fact
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

import torch
from PIL import Image

from .config import LLAVA_NEXT_GRIDS, TilingConfig
from . import tiling as T


@dataclass(frozen=True)
class TileSpec:
    """A tiling mode (anyres | internvl | naflex) at a tile size. Frozen and picklable (data-loader workers)."""

    mode: str
    tile: int
    pinpoints: tuple[tuple[int, int], ...] = ()
    """anyres canvases as (height, width) pixel pairs, multiples of `tile`."""
    anyres_max: int | None = None
    unpad: bool = True
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    patch: int = 0
    """naflex: the encoder's patch side in pixels."""
    max_num_patches: int = 0
    """naflex: at most this many patches per image."""
    multiple: int = 1
    """naflex: both sides of every patch grid are multiples of it (the connector's `grid_multiple`)."""

    @classmethod
    def from_config(cls, cfg: TilingConfig | None, tile: int, geometry=None, multiple: int = 1) -> TileSpec | None:
        """None for mode none (one tile per image, no tiling). naflex needs `geometry`, the encoder's
        EncoderGeometry (patch size; num_patches, the default max_num_patches), and the grid `multiple`."""
        if cfg is None or cfg.mode == "none":
            return None
        if cfg.mode == "naflex":
            return cls.naflex(cfg, geometry, multiple)
        if cfg.mode == "anyres":
            if cfg.grid_pinpoints is None:
                pins = [(r * tile, c * tile) for r, c in LLAVA_NEXT_GRIDS]
            else:
                pins = T.parse_grid_pinpoints(cfg.grid_pinpoints, tile)
            bad = [p for p in pins if p[0] % tile or p[1] % tile]
            if bad:
                raise ValueError(f"tiling.grid_pinpoints {bad} ([height, width] pixels) are not multiples of the "
                                 f"encoder's tile size {tile}px")
            return cls("anyres", tile, tuple(pins), cfg.anyres_max, cfg.unpad)
        return cls("internvl", tile, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, thumbnail=cfg.thumbnail)

    @classmethod
    def naflex(cls, cfg: TilingConfig, geometry, multiple: int = 1) -> TileSpec:
        """SigLIP 2 NaFlex over a NaFlex encoder's geometry; `multiple` k: grids of k x k patch blocks."""
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
        return cls("naflex", geometry.image_size, patch=geometry.patch_size, max_num_patches=max_patches,
                   multiple=multiple)

    # ---- tiles ---------------------------------------------------------------------------
    def _bounds(self, n_images: int) -> tuple[int, int]:
        """internvl (min, max) tiles of one image in a sample of `n_images` images."""
        hi = T.internvl_tile_budget(self.max_tiles, max(1, n_images))
        return min(self.min_tiles, hi), hi

    def grid(self, size, n_images: int = 1) -> tuple[int, int]:
        """anyres: (rows, cols) of tiles; internvl: (cols, rows) of tiles, as in vlmkit.tiling; naflex: the
        image's patch grid (rows, cols) (SigLIP 2's spatial_shapes)."""
        if self.mode == "anyres":
            return T.anyres_grid(size, self.pinpoints, self.tile)
        if self.mode == "naflex":
            return T.naflex_grid(size, self.patch, self.max_num_patches, self.multiple)
        return T.internvl_grid(size, self.tile, *self._bounds(n_images))

    def num_tiles(self, size, n_images: int = 1) -> int:
        """Tiles an image of `size` (width, height) is cut into (anyres: the base tile included)."""
        if self.mode == "anyres":
            rows, cols = self.grid(size)
            return 1 + rows * cols
        if self.mode == "naflex":
            return 1
        return T.internvl_num_tiles(size, self.tile, *self._bounds(n_images), self.thumbnail)

    def split(self, image: Image.Image, n_images: int = 1, fill=(0, 0, 0)) -> list[Image.Image]:
        """anyres: base tile, then the canvas row-major (padded with `fill`, black as LLaVA-NeXT);
        internvl: row-major tiles, then the thumbnail; naflex: the image resized to its own patch grid."""
        if self.mode == "anyres":
            return T.anyres_tiles(image, self.pinpoints, self.tile, fill=fill)
        if self.mode == "naflex":
            return [T.naflex_resize(image, self.patch, self.max_num_patches, self.multiple)]
        return T.internvl_tiles(image, self.tile, *self._bounds(n_images), self.thumbnail)

    # ---- tokens --------------------------------------------------------------------------
    @staticmethod
    def feature_side(tokens_per_tile: int) -> int:
        g = math.isqrt(tokens_per_tile)
        if g * g != tokens_per_tile:
            raise ValueError(f"anyres needs a square feature grid per tile, the connector gives {tokens_per_tile} tokens")
        return g

    def num_tokens(self, size, tokens_per_tile: int, n_images: int = 1) -> int:
        """Placeholder count of one image: what `pack` returns for it. naflex: `tokens_per_tile` must be the
        connector's count for this image's own grid (ImageTokenCounter passes it)."""
        if self.mode == "anyres" and self.unpad:
            g = self.feature_side(tokens_per_tile)
            return T.anyres_num_tokens(size, self.pinpoints, self.tile, g, self.anyres_max)
        return tokens_per_tile * self.num_tiles(size, n_images)

    @property
    def uses_newline(self) -> bool:
        """Whether the model needs a learned `image_newline` (anyres with unpad, as LLaVA-NeXT)."""
        return self.mode == "anyres" and self.unpad

    def pack(self, feats: torch.Tensor, size, image_newline: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tile features [n_tiles, P, D] (in `split` order) -> its tokens [num_tokens, D]."""
        if self.mode in ("internvl", "naflex"):
            return feats.reshape(-1, feats.shape[-1])  # tiles row-major, thumbnail last; naflex: its one "tile"
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
