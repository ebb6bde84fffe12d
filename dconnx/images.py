"""Image files → model inputs for a converted model: size, layout and normalization from its metadata.

Shared by the server, `explain-dataset` and the Ray engine so every path feeds the same numbers.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .viz import IMAGENET_MEAN, IMAGENET_STD, load_image

MAX_PIXELS = 40_000_000     # an upload that decodes to more is refused before decoding (a "zip bomb")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageInput:
    """How images become inputs of one converted model."""
    height: int
    width: int
    channels: int
    channel_axis: int          # 1 (NCHW) or 3 (NHWC) in the batched input
    mean: tuple
    std: tuple

    @classmethod
    def from_explainer(cls, ex, mean=None, std=None) -> "ImageInput":
        shape = ex.input_shape
        if len(shape) != 4:
            raise InputError(f"images need a 4-d model input [batch, C, H, W] or [batch, H, W, C]; "
                             f"this model takes {shape}")
        axis = int(ex.meta.get("dconnx.channel_axis", "1"))
        if axis == 3:
            h, w, c = shape[1], shape[2], shape[3]
        else:
            c, h, w = shape[1], shape[2], shape[3]
        if not all(isinstance(d, int) for d in (c, h, w)):
            raise InputError(f"images need fixed channel and spatial sizes; this model takes {shape}")
        pre = json.loads(ex.meta.get("dconnx.preprocess", "{}"))
        return cls(h, w, c, axis, tuple(mean or pre.get("mean") or IMAGENET_MEAN),
                   tuple(std or pre.get("std") or IMAGENET_STD))

    def load(self, source, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
        """A path or encoded bytes → (one model input without batch axis, RGB picture in [0, 1])."""
        size = (self.height, self.width)
        if isinstance(source, (bytes, bytearray, memoryview)):
            checked = decoded_source(bytes(source), max_pixels)
            try:
                x, rgb = load_image(checked, size, self.mean, self.std, channels=self.channels)
            except InputError as e:
                raise InputError(f"cannot decode the image: {e.__cause__ or e}") from None
        else:
            x, rgb = load_image(source, size, self.mean, self.std, channels=self.channels)
        if self.channel_axis == 3:
            x = np.ascontiguousarray(np.moveaxis(x, 0, -1))
        return x, rgb

    def picture(self, x: np.ndarray) -> np.ndarray:
        """One model input (no batch axis) back to an RGB picture in [0, 1], for overlays."""
        from .viz import image_from_input
        if self.channel_axis == 3:
            x = np.moveaxis(x, -1, 0)
        return image_from_input(x, self.mean, self.std)


def decoded_source(data: bytes, max_pixels: int = MAX_PIXELS) -> io.BytesIO:
    """Encoded image bytes, checked to be a readable image of at most max_pixels before decoding."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise InputError(f"{len(data)} bytes that are not an image file Pillow can read") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot decode the image ({len(data)} bytes): {e}") from None
    if w * h > max_pixels:
        raise InputError(f"the image is {w}x{h} pixels; at most {max_pixels} are accepted")
    return io.BytesIO(data)


def list_images(folder) -> list[Path]:
    """Image files under folder (recursive), in a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"no image folder at '{root}'")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
