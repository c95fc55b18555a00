"""Image files -> normalised pixel tensors. PIL and numpy only (no torchvision)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bomb limit, made explicit


def load_image(path: str) -> Image.Image:
    """Open an image fully, apply its EXIF rotation and convert any mode to RGB.

    Palette and RGBA images are composited on white, 16-bit and greyscale images rescaled.
    Raises OSError / ValueError naming the file when it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e}") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
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
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # [3, H, W]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def blank(self) -> torch.Tensor:
        """A uniform mean-colour image (all zeros after normalisation, up to rounding)."""
        return self(Image.new("RGB", (self.size, self.size), self.fill))
