"""Image tiling as pure functions: LLaVA-NeXT AnyRes, InternVL dynamic tiling, SigLIP 2 NaFlex.

Conventions (read these once, they hold for the whole module):

* An **image size** is always ``(width, height)``, the order of ``PIL.Image.size``.
* A **pixel resolution** from a grid-pinpoint list (AnyRes candidates and the chosen
  resolution) is ``(height, width)``, the order transformers' LLaVA-NeXT / OneVision
  configs store in ``image_grid_pinpoints``. This lets a config exported to transformers
  carry our list unchanged.
* A **feature grid / tile grid** is ``(rows, cols)`` for AnyRes (rows of tiles top to
  bottom) and ``(cols, rows)`` for InternVL, whose published code names the grid
  ``(i, j)`` with ``i`` the column count (``target_width = tile * i``). Each function
  says which one it returns.
* A **NaFlex patch grid** is ``(rows, cols)``, the order of the SigLIP 2 processor's
  ``spatial_shapes``.

Tiles are returned row-major (left to right, then top to bottom). The AnyRes base image
(the whole picture resized to one tile) comes *first*; the InternVL thumbnail comes
*last*. The token count of an AnyRes image is computed in one place,
:func:`anyres_feature_grid`, used both by :func:`anyres_num_tokens` (data side) and by
:func:`pack_anyres_features` (model side), so the two can never disagree.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image

__all__ = [
    "parse_grid_pinpoints",
    "select_best_resolution",
    "patch_output_size",
    "resize_and_pad_for_patching",
    "anyres_grid",
    "anyres_tiles",
    "unpad_shape",
    "unpad_features",
    "anyres_feature_grid",
    "anyres_num_tokens",
    "parse_anyres_max",
    "pack_anyres_features",
    "internvl_candidate_grids",
    "internvl_grid",
    "internvl_num_tiles",
    "internvl_tiles",
    "internvl_tile_budget",
    "naflex_size",
    "naflex_grid",
    "naflex_resize",
    "naflex_patches",
]

_RESAMPLE = Image.Resampling.BICUBIC


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size (width, height) must be positive, got {tuple(image_size)}")
    return width, height


# ----------------------------------------------------------------------------------------
# LLaVA-NeXT AnyRes
# ----------------------------------------------------------------------------------------


def parse_grid_pinpoints(spec, tile: int) -> list[tuple[int, int]]:
    """Candidate resolutions as a list of ``(height, width)`` pixel pairs.

    ``spec`` may be:

    * a list of ``[height, width]`` pairs in pixels (transformers' ``image_grid_pinpoints``
      convention), returned as tuples in the same order;
    * the string range form of LLaVA-NeXT's ``anyres_max_N`` configs, e.g.
      ``"(1x1),...,(6x6)"``: only the first and last ``(AxB)`` matter, every ``(a, b)``
      with ``a`` from A_first..A_last (outer loop) and ``b`` from B_first..B_last (inner
      loop) is produced, times ``tile``. The result equals transformers' default
      ``LlavaOnevisionConfig.image_grid_pinpoints`` for ``"(1x1),...,(6x6)"`` and 384;
    * a Python-literal string of pairs, e.g. ``"[(336, 672), (672, 336)]"``, read with
      ``ast.literal_eval`` and taken as ``(height, width)`` like a list.

    Note: the original LLaVA-NeXT code reads every pair as ``(width, height)``;
    transformers copies the same lists but reads them as ``(height, width)``. The sets
    are symmetric in shipped configs, so only tie-breaking order differs (see
    :func:`select_best_resolution`). We follow transformers.
    """
    if isinstance(spec, str):
        if "x" in spec:
            pairs = re.findall(r"\((\d+)\s*x\s*(\d+)\)", spec)
            if not pairs:
                raise ValueError(f"no '(AxB)' pairs found in grid spec {spec!r}")
            (a0, b0), (a1, b1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
            out = [(a * tile, b * tile) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)]
            if not out:
                raise ValueError(f"grid spec {spec!r} gives an empty range")
            return out
        spec = ast.literal_eval(spec)
    out = []
    for pair in spec:
        h, w = (int(v) for v in pair)
        if h <= 0 or w <= 0:
            raise ValueError(f"grid pinpoints must be positive, got {pair}")
        out.append((h, w))
    if not out:
        raise ValueError("empty grid pinpoints")
    return out


def select_best_resolution(
    image_size: Sequence[int], candidates: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the AnyRes canvas for an image.

    Args:
        image_size: ``(width, height)`` of the image in pixels.
        candidates: ``(height, width)`` pixel pairs (transformers' pinpoint order).

    Returns:
        The chosen candidate as ``(height, width)``.

    For each candidate: ``scale = min(cw / W, ch / H)``,
    ``effective = min(int(W * scale) * int(H * scale), W * H)``,
    ``wasted = cw * ch - effective``. The largest ``effective`` wins; ties go to the least
    ``wasted``; remaining ties to the earliest candidate (so order matters, e.g. for
    336x672 vs 672x336 on a small image).
    """
    width, height = _check_size(image_size)
    best, best_eff, best_waste = None, -1, math.inf
    for ch, cw in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_eff or (effective == best_eff and wasted < best_waste):
            best, best_eff, best_waste = (ch, cw), effective, wasted
    if best is None:
        raise ValueError("no candidate resolutions")
    return best


def patch_output_size(image_size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """Size of the image after the aspect-keeping resize onto an AnyRes canvas.

    Args:
        image_size: ``(width, height)`` of the image.
        target: the canvas as ``(height, width)``.

    Returns:
        ``(width, height)`` of the resized image (before padding). The side that limits
        the scale is filled exactly; the other is ``ceil``-ed and clipped to the canvas.
    """
    width, height = _check_size(image_size)
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return tw, min(math.ceil(height * scale_w), th)
    return min(math.ceil(width * scale_h), tw), th


def resize_and_pad_for_patching(
    image: Image.Image,
    target: Sequence[int],
    fill: int | tuple[int, ...] = (0, 0, 0),
    resample: Image.Resampling = _RESAMPLE,
) -> Image.Image:
    """Resize ``image`` keeping its aspect ratio onto a ``target`` canvas and pad centred.

    Args:
        image: a PIL image; its size is read as ``(width, height)``.
        target: the canvas as ``(height, width)`` (e.g. from :func:`select_best_resolution`).
        fill: the padding colour (LLaVA-NeXT and transformers use black, 0).
        resample: PIL resampling filter (transformers' LLaVA-NeXT uses bicubic).

    Returns:
        A PIL image of size ``(width, height) = (target[1], target[0])``. The left/top pad
        is ``floor(extra / 2)``, the odd pixel goes right/bottom.
    """
    th, tw = target
    new_w, new_h = patch_output_size(image.size, target)
    resized = image.resize((new_w, new_h), resample=resample)
    canvas = Image.new(image.mode, (tw, th), fill)
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def anyres_grid(image_size: Sequence[int], pinpoints, tile: int) -> tuple[int, int]:
    """Tile grid for an image as ``(rows, cols)``.

    Args:
        image_size: ``(width, height)`` of the image.
        pinpoints: anything :func:`parse_grid_pinpoints` accepts.
        tile: the encoder's input size in pixels (e.g. 336).
    """
    ch, cw = select_best_resolution(image_size, parse_grid_pinpoints(pinpoints, tile))
    return ch // tile, cw // tile


def anyres_tiles(
    image: Image.Image,
    pinpoints,
    tile: int,
    fill: int | tuple[int, ...] = (0, 0, 0),
    resample: Image.Resampling = _RESAMPLE,
) -> list[Image.Image]:
    """AnyRes tiles of an image: ``[base] + crops``, each ``tile x tile``.

    The base image is the whole image resized (not padded) to ``tile x tile``. The crops
    cut the resized-and-padded canvas row-major; there are ``rows * cols`` of them
    (see :func:`anyres_grid`). ``image.size`` is read as ``(width, height)``.
    """
    target = select_best_resolution(image.size, parse_grid_pinpoints(pinpoints, tile))
    canvas = resize_and_pad_for_patching(image, target, fill=fill, resample=resample)
    tiles = [image.resize((tile, tile), resample=resample)]
    th, tw = target
    for top in range(0, th, tile):
        for left in range(0, tw, tile):
            tiles.append(canvas.crop((left, top, left + tile, top + tile)))
    return tiles


def unpad_shape(grid_hw: Sequence[int], image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Where the image content lies in a padded AnyRes feature grid.

    Args:
        grid_hw: the feature grid as ``(height, width)`` (``rows * g``, ``cols * g``).
        image_size: the original image as ``(width, height)``.

    Returns:
        ``(top, left, new_height, new_width)``: keep ``grid[top:top+new_height,
        left:left+new_width]``. Rounding follows transformers' ``unpad_image``:
        ``int(round(x, 7))`` of the scaled side, then ``(cur - new) // 2`` cut from *both*
        ends (so an odd remainder keeps one padded row/column).
    """
    width, height = _check_size(image_size)
    cur_h, cur_w = (int(v) for v in grid_hw)
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


def unpad_features(
    features: torch.Tensor, image_size: Sequence[int], channels_last: bool = False
) -> torch.Tensor:
    """Crop the padding from a feature grid (transformers' ``unpad_image``).

    Args:
        features: ``[C, H, W]``, or ``[H, W, C]`` with ``channels_last=True``.
        image_size: the original image as ``(width, height)``. (transformers'
            ``unpad_image`` takes ``(height, width)``; this function does not.)

    Returns:
        A view of ``features`` with the padded rows or columns removed.
    """
    h_dim = 0 if channels_last else 1
    cur_h, cur_w = features.shape[h_dim], features.shape[h_dim + 1]
    top, left, new_h, new_w = unpad_shape((cur_h, cur_w), image_size)
    return features.narrow(h_dim, top, new_h).narrow(h_dim + 1, left, new_w)


def parse_anyres_max(spec: str | int | None) -> int | None:
    """``"anyres_max_9"`` -> 9, ``9`` -> 9, ``None`` / ``"anyres"`` -> None."""
    if spec is None or isinstance(spec, int):
        return spec
    m = re.fullmatch(r"anyres_max_(\d+)", spec.strip())
    if m:
        return int(m.group(1))
    if spec.strip() == "anyres":
        return None
    raise ValueError(f"expected 'anyres' or 'anyres_max_N', got {spec!r}")


def _downscaled(h: int, w: int, grid: int, max_num_patches: int | None) -> tuple[int, int]:
    """LLaVA-OneVision's anyres_max_N rule on an unpadded ``h x w`` feature grid.

    ``ratio = sqrt(h * w / (N * g * g))``; only if ``ratio > 1.1`` is the grid resized
    (bilinear) to ``(int(h // ratio), int(w // ratio))``.
    """
    if max_num_patches is None:
        return h, w
    ratio = math.sqrt(h * w / (max_num_patches * grid**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def anyres_feature_grid(
    image_size: Sequence[int],
    pinpoints,
    tile: int,
    grid: int,
    max_num_patches: int | str | None = None,
) -> dict[str, int]:
    """All the AnyRes shape facts for one image, computed in one place.

    Args:
        image_size: ``(width, height)`` of the original image.
        pinpoints: anything :func:`parse_grid_pinpoints` accepts.
        tile: encoder input size in pixels (336 for CLIP-L/336, 384 for SigLIP-384).
        grid: features per tile side after the connector (24 for 336/14, 27 for 384/14).
        max_num_patches: ``N`` of ``anyres_max_N`` (or that string), None for plain AnyRes.

    Returns:
        dict with ``rows``, ``cols`` (tile grid), ``padded_h``, ``padded_w``
        (``rows * grid``, ``cols * grid``), ``top``, ``left``, ``unpad_h``, ``unpad_w``
        (after cropping the padding), ``h``, ``w`` (after the optional anyres_max
        downscale) and ``num_tokens`` (``grid**2`` base tokens + ``h * (w + 1)``:
        one ``image_newline`` after each row).
    """
    rows, cols = anyres_grid(image_size, pinpoints, tile)
    ph, pw = rows * grid, cols * grid
    top, left, uh, uw = unpad_shape((ph, pw), image_size)
    h, w = _downscaled(uh, uw, grid, parse_anyres_max(max_num_patches))
    return dict(
        rows=rows, cols=cols, padded_h=ph, padded_w=pw, top=top, left=left,
        unpad_h=uh, unpad_w=uw, h=h, w=w, num_tokens=grid * grid + h * (w + 1),
    )


def anyres_num_tokens(
    image_size: Sequence[int],
    pinpoints,
    tile: int,
    grid: int,
    max_num_patches: int | str | None = None,
) -> int:
    """Number of image tokens for one AnyRes image with unpad and newlines.

    Args:
        image_size: ``(width, height)`` of the original image.
        pinpoints, tile, grid, max_num_patches: see :func:`anyres_feature_grid`.

    Equals what transformers' ``LlavaNextProcessor`` (``max_num_patches=None``) and
    ``LlavaOnevisionProcessor`` (``"anyres_max_N"``) put in the prompt for an encoder
    whose CLS token is dropped (``vision_feature_select_strategy="default"``).
    """
    return anyres_feature_grid(image_size, pinpoints, tile, grid, max_num_patches)["num_tokens"]


def pack_anyres_features(
    features: torch.Tensor,
    image_size: Sequence[int],
    pinpoints,
    tile: int,
    image_newline: torch.Tensor | None,
    max_num_patches: int | str | None = None,
) -> torch.Tensor:
    """Model side of AnyRes: turn per-tile features into the token sequence.

    Args:
        features: ``[1 + rows*cols, g*g, C]`` (base tile first, tiles row-major).
        image_size: ``(width, height)`` of the original image.
        pinpoints, tile, max_num_patches: as for :func:`anyres_feature_grid`.
        image_newline: ``[C]`` vector appended after each feature row (None: no newline;
            then the count is ``anyres_num_tokens - h``).

    Returns:
        ``[num_tokens, C]``: the base tile's ``g*g`` tokens, then the unpadded (and
        possibly downscaled) ``h x w`` grid row by row, each row followed by the newline.
    """
    n, p, c = features.shape
    g = math.isqrt(p)
    if g * g != p:
        raise ValueError(f"tokens per tile {p} is not a square")
    info = anyres_feature_grid(image_size, pinpoints, tile, g, max_num_patches)
    rows, cols = info["rows"], info["cols"]
    if n != 1 + rows * cols:
        raise ValueError(
            f"expected 1 + {rows}x{cols} tiles for image size {tuple(image_size)} (width, height), got {n}"
        )
    base, tiles = features[0], features[1:]
    # [rows*cols, g*g, C] -> [C, rows*g, cols*g]
    grid_feat = tiles.view(rows, cols, g, g, c).permute(4, 0, 2, 1, 3).reshape(c, rows * g, cols * g)
    grid_feat = grid_feat[:, info["top"] : info["top"] + info["unpad_h"], info["left"] : info["left"] + info["unpad_w"]]
    if (info["h"], info["w"]) != (info["unpad_h"], info["unpad_w"]):
        grid_feat = torch.nn.functional.interpolate(grid_feat[None], [info["h"], info["w"]], mode="bilinear")[0]
    if image_newline is not None:
        nl = image_newline.to(grid_feat.dtype)[:, None, None].expand(c, info["h"], 1)
        grid_feat = torch.cat((grid_feat, nl), dim=-1)
    return torch.cat((base, grid_feat.flatten(1, 2).transpose(0, 1)), dim=0)


# ----------------------------------------------------------------------------------------
# InternVL dynamic tiling
# ----------------------------------------------------------------------------------------


def internvl_candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` grids with ``min_tiles <= cols*rows <= max_tiles``, in InternVL's order.

    InternVL builds the grids as a Python ``set`` (n from min..max, then i, j from 1..n)
    and sorts it by ``cols*rows`` with a stable sort, so within one tile count the order
    is CPython's set order. We reproduce that order by building the set the same way.
    It only matters when two grids with the same tile count are exactly equally close
    to the image's aspect ratio, which cannot happen with ``min_tiles == 1``.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_tiles <= i * j <= max_tiles:
                    grids.add((i, j))
    return sorted(grids, key=lambda g: g[0] * g[1])


def internvl_grid(
    image_size: Sequence[int], tile: int = 448, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """InternVL's tile grid for an image, as ``(cols, rows)``.

    Args:
        image_size: ``(width, height)`` of the image.
        tile: tile side in pixels (448 for InternViT-300M/6B).
        min_tiles, max_tiles: bounds on ``cols * rows``.

    Returns:
        ``(cols, rows)``: the image is resized to ``(tile * cols, tile * rows)`` as
        ``(width, height)``. The grid whose ``cols / rows`` is closest to ``W / H`` wins;
        on an exact tie a later candidate replaces the current one only when
        ``W * H > 0.5 * tile**2 * cols * rows`` (InternVL's ``find_closest_aspect_ratio``).
    """
    width, height = _check_size(image_size)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in internvl_candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def internvl_num_tiles(
    image_size: Sequence[int],
    tile: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> int:
    """Number of tiles :func:`internvl_tiles` returns for an image of ``(width, height)``."""
    cols, rows = internvl_grid(image_size, tile, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n != 1 else n


def internvl_tiles(
    image: Image.Image,
    tile: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    resample: Image.Resampling = _RESAMPLE,
) -> list[Image.Image]:
    """InternVL dynamic tiling of a PIL image (size read as ``(width, height)``).

    The image is resized (aspect not kept) to ``(tile * cols, tile * rows)`` and cut into
    ``tile x tile`` crops row-major; when there is more than one crop and
    ``use_thumbnail`` is set, the whole image resized to ``tile x tile`` is added *last*.
    """
    cols, rows = internvl_grid(image.size, tile, min_tiles, max_tiles)
    resized = image.resize((tile * cols, tile * rows), resample=resample)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile), resample=resample))
    return tiles


def internvl_tile_budget(max_tiles: int, n_images: int) -> int:
    """Per-image ``max_tiles`` for a sample with ``n_images`` images: ``max(1, max_tiles // n_images)``."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return max(1, max_tiles // n_images)


# ----------------------------------------------------------------------------------------
# SigLIP 2 NaFlex (native aspect ratio, at most a number of patches)
# ----------------------------------------------------------------------------------------

NAFLEX_RESAMPLE = Image.Resampling.BILINEAR
"""The SigLIP 2 image processor's resampling filter."""


def naflex_size(
    image_size: Sequence[int], patch: int, max_num_patches: int, multiple: int = 1, eps: float = 1e-5
) -> tuple[int, int]:
    """SigLIP 2's NaFlex resize target for an image, as ``(width, height)`` in pixels.

    Both sides are scaled by one factor (the aspect ratio kept, up to rounding), each rounded *up*
    to a multiple of ``patch * multiple`` (at least one such unit), and the factor is the largest
    one found by bisection of [eps / 10, 100] (until the interval is narrower than ``eps``) with
    ``rows * cols <= max_num_patches``: transformers' ``get_image_size_for_max_num_patches``,
    whose arithmetic this repeats step by step (``multiple = 1`` gives its result exactly).
    ``multiple = k`` makes both sides of the patch grid multiples of k (a pixel-shuffle connector
    folding k x k patches). Cached: the data side and the model side both ask.

    Args:
        image_size: ``(width, height)`` of the image.
        patch: the encoder's patch side in pixels.
        max_num_patches: at most this many patches (``rows * cols``).
        multiple: each grid side is a multiple of it.

    Returns:
        ``(width, height)`` in pixels, each a multiple of ``patch * multiple``.
    """
    width, height = _check_size(image_size)
    return _naflex_size(width, height, int(patch), int(max_num_patches), int(multiple), float(eps))


@lru_cache(maxsize=1 << 16)
def _naflex_size(width: int, height: int, patch: int, max_num_patches: int, multiple: int,
                 eps: float) -> tuple[int, int]:
    if patch < 1 or multiple < 1:
        raise ValueError(f"naflex: patch ({patch}) and multiple ({multiple}) must be positive")
    if max_num_patches < multiple * multiple:
        raise ValueError(f"naflex: max_num_patches {max_num_patches} is below one {multiple}x{multiple} block of "
                         f"patches (grid sides must be multiples of {multiple})")
    unit = patch * multiple

    def side(scale: float, n: int) -> int:
        return max(unit, math.ceil(n * scale / unit) * unit)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    w, h = side(lo, width), side(lo, height)
    if (w // patch) * (h // patch) > max_num_patches:  # only for sides over ~1e6 patches at the smallest scale
        raise ValueError(f"naflex: image size {(width, height)} (width, height) cannot be scaled to at most "
                         f"{max_num_patches} patches of {patch}px")
    return w, h


def naflex_grid(
    image_size: Sequence[int], patch: int, max_num_patches: int, multiple: int = 1
) -> tuple[int, int]:
    """The NaFlex patch grid ``(rows, cols)`` of an image of ``(width, height)``: the SigLIP 2
    processor's ``spatial_shapes`` entry for it (see :func:`naflex_size`)."""
    w, h = naflex_size(image_size, patch, max_num_patches, multiple)
    return h // patch, w // patch


def naflex_resize(
    image: Image.Image, patch: int, max_num_patches: int, multiple: int = 1,
    resample: Image.Resampling = NAFLEX_RESAMPLE,
) -> Image.Image:
    """The image resized to its :func:`naflex_size` (bilinear, as the SigLIP 2 processor)."""
    size = naflex_size(image.size, patch, max_num_patches, multiple)
    return image if size == image.size else image.resize(size, resample=resample)


def naflex_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [rows * cols, patch * patch * C]: patches row-major, each flattened channel-last
    (patch row, patch column, channel), the layout SigLIP 2's patch embedding (a Linear) reads."""
    c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"naflex: image {w}x{h} (width x height) is not a multiple of the patch size {patch}")
    rows, cols = h // patch, w // patch
    x = pixels.reshape(c, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)  # [rows, cols, p, p, C]
    return x.reshape(rows * cols, patch * patch * c)
