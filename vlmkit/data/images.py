"""Image files -> normalised pixel tensors. PIL and numpy only (no torchvision)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bomb limit, made explicit
MAX_IMAGE_PIXELS = 178_956_970
"""vlmkit's default limit: an image whose header declares more pixels is refused before decoding.

Configurable per dataset (`data.max_image_pixels`, `check-data --max-image-pixels`). It bounds every
buffer made from an image too (the square canvas of `pad` mode). With it set, vlmkit's limit is the one
that decides (PIL's own is suspended while a header is read); with it off (None or 0), PIL's own hard
limit (2 x `PIL.Image.MAX_IMAGE_PIXELS`) still applies."""
MAX_ASPECT_RATIO = 200
"""vlmkit's default limit on an image's aspect ratio (long side / short side): a thinner image is refused from
its header (a 1 x 30000 image is a sliver of any model input; padded to a square it would need 30000^2 pixels).
Configurable per dataset (`data.max_aspect_ratio`, `check-data --max-aspect-ratio`; None or 0: no limit)."""


class ImageError(OSError):
    """An image that cannot be used. `kind`: missing_image | corrupt_image | image_too_large |
    extreme_aspect_ratio | image_outside_folder."""

    def __init__(self, message: str, kind: str = "corrupt_image"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes (data-loader workers)
        return type(self), (str(self), self.kind)


@contextmanager
def _pil_limit_off(off: bool):
    """Suspend PIL's own decompression-bomb check while a header is read, when vlmkit's limit decides instead
    (so that a refusal quotes the configured data.max_image_pixels, not PIL's figure)."""
    if not off:
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(src, max_pixels: int | None = MAX_IMAGE_PIXELS, name: str | None = None,
               max_aspect_ratio: float | None = None, canvas: Callable | None = None) -> Image.Image:
    """Open an image lazily (only its header is read) and refuse it, before anything is decoded, when the header
    declares more than `max_pixels` pixels (a decompression bomb), an aspect ratio over `max_aspect_ratio`, or a
    size whose largest buffer (`canvas(width, height)` -> (pixels, what it is)) would exceed `max_pixels`.
    `src`: a path or a file object."""
    name = name or str(src)
    try:
        with warnings.catch_warnings(), _pil_limit_off(bool(max_pixels)):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # vlmkit's own check decides below
            im = Image.open(src)
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}", "missing_image") from None
    except IsADirectoryError:
        raise ImageError(f"image {name} is a directory, not a file", "missing_image") from None
    except Image.DecompressionBombError as e:  # only with vlmkit's limit off: PIL's hard limit
        raise ImageError(f"image {name} refused before decoding: {e} (PIL's hard limit; data.max_image_pixels "
                         f"is off)", "image_too_large") from None
    except Exception as e:  # any failure to parse the header: not an image, or a broken one
        raise ImageError(f"cannot read image {name}: {e}", "corrupt_image") from None
    try:
        check_size(im.size, max_pixels, name, max_aspect_ratio, canvas)
    except ImageError:
        im.close()
        raise
    return im


def check_size(size: tuple[int, int], max_pixels: int | None, name: str, max_aspect_ratio: float | None = None,
               canvas: Callable | None = None) -> None:
    """Refuse an image from its size alone (its header): too many pixels, too thin, or a largest buffer (the
    `canvas` the processor would make of it) over `max_pixels`."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"image {name} declares a size of {w}x{h}", "corrupt_image")
    if max_pixels and w * h > max_pixels:
        raise ImageError(f"image {name} declares {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         f"(a decompression bomb?); refused before decoding. Raise data.max_image_pixels "
                         f"(check-data --max-image-pixels) to accept it", "image_too_large")
    ratio = max(w, h) / min(w, h)
    if max_aspect_ratio and ratio > max_aspect_ratio:
        raise ImageError(f"image {name} is {w}x{h}: an aspect ratio of {ratio:,.0f}:1, over the limit of "
                         f"{max_aspect_ratio:g}:1; refused before decoding (it would be a sliver of the model's "
                         f"input). Raise data.max_aspect_ratio (check-data --max-aspect-ratio) to accept it",
                         "extreme_aspect_ratio")
    if max_pixels and canvas is not None:
        pixels, what = canvas(w, h)
        if pixels > max_pixels:
            raise ImageError(f"image {name} is {w}x{h}: {what} of {pixels:,} pixels, over the limit of "
                             f"{max_pixels:,}; refused before decoding. Raise data.max_image_pixels "
                             f"(check-data --max-image-pixels) to accept it", "image_too_large")


def load_image(src, max_pixels: int | None = MAX_IMAGE_PIXELS, name: str | None = None,
               max_aspect_ratio: float | None = MAX_ASPECT_RATIO, canvas: Callable | None = None) -> Image.Image:
    """Open an image fully, apply its EXIF rotation and convert any mode to RGB.

    Palette and RGBA images are composited on white, 16-bit and greyscale images rescaled.
    Raises ImageError (an OSError) naming the file when it is missing, truncated, not an image,
    larger than `max_pixels`, thinner than `max_aspect_ratio` allows, or when its largest buffer
    (`canvas`, see open_image) would exceed `max_pixels` (all checked from the header, before decoding).
    """
    name = name or str(src)
    im = open_image(src, max_pixels, name, max_aspect_ratio, canvas)
    try:
        with im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # decoders raise OSError mostly, but also SyntaxError, EOFError, struct.error...
        raise ImageError(f"cannot read image {name}: {e}", "corrupt_image") from None
    return to_rgb(im)


def prepare_image(im: Image.Image, max_pixels: int | None = MAX_IMAGE_PIXELS, name: str = "image",
                  max_aspect_ratio: float | None = MAX_ASPECT_RATIO, canvas: Callable | None = None) -> Image.Image:
    """An already opened PIL image (e.g. from an HF Image feature) through the same steps as load_image."""
    if not isinstance(im, Image.Image):
        raise ImageError(f"{name}: expected an image (a path, {{path}} / {{bytes}} or a PIL image), got "
                         f"{type(im).__name__} {im!r:.60}", "corrupt_image")
    check_size(im.size, max_pixels, name, max_aspect_ratio, canvas)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:
        raise ImageError(f"cannot read image {name}: {e}", "corrupt_image") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # I;16 is 16-bit by definition (a dark 16-bit image is not an 8-bit one); "I" (32-bit) is
        # what older Pillow gives 16-bit PNGs, and some tools store 8-bit data in it: judge by range
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def expand_to_square(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `pad` mode: centre the image on a square filled with the mean colour."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), fill)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


@dataclass(frozen=True)
class ImageTransform:
    """One image -> [3, size, size] float tensor, normalised with the encoder's statistics."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"

    @property
    def fill(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            im = expand_to_square(im, self.fill)
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return self.normalize(im)

    def normalize(self, im: Image.Image) -> torch.Tensor:
        """An RGB image at its own size -> [3, H, W], scaled to [0, 1] and normalised (no pad, no resize)."""
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # [3, H, W]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def blank(self) -> torch.Tensor:
        """A uniform mean-colour image (all zeros after normalisation, up to rounding)."""
        return self(Image.new("RGB", (self.size, self.size), self.fill))
