"""Heatmap pictures: colormaps, overlays on the input image, labelled panels (numpy + Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def diverging(v: np.ndarray) -> np.ndarray:
    """Blue (negative) – white (0) – red (positive) for v in [−1, 1] → RGB in [0, 1]."""
    v = np.clip(v, -1.0, 1.0)[..., None]
    white = np.ones(3)
    red, blue = np.array([0.80, 0.05, 0.05]), np.array([0.05, 0.20, 0.80])
    pos = white + (red - white) * np.clip(v, 0, 1)
    neg = white + (blue - white) * np.clip(-v, 0, 1)
    return np.where(v >= 0, pos, neg)


def hot(v: np.ndarray) -> np.ndarray:
    """Black – red – yellow – white for v in [0, 1] → RGB in [0, 1]."""
    v = np.clip(v, 0.0, 1.0)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)


def scaled(heat: np.ndarray) -> tuple[np.ndarray, bool]:
    """Heat scaled to [−1, 1] (signed) or [0, 1] (nonnegative) by its largest magnitude."""
    heat = np.asarray(heat, dtype=np.float64)
    if not np.all(np.isfinite(heat)):
        raise InputError("the map contains NaN or Inf")
    signed = bool(np.any(heat < 0))
    m = np.max(np.abs(heat))
    return (heat / m if m > 0 else heat), signed


def colorize(heat: np.ndarray) -> np.ndarray:
    v, signed = scaled(heat)
    return diverging(v) if signed else hot(v)


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.65) -> np.ndarray:
    """The heatmap blended over an RGB image in [0, 1], weighted by |heat|; uint8 [H, W, 3]."""
    v, signed = scaled(heat)
    colors = diverging(v) if signed else hot(v)
    w = strength * np.abs(v)[..., None] ** 0.5
    gray = image.mean(-1, keepdims=True) * np.ones(3)
    base = 0.35 * image + 0.65 * gray
    out = (1 - w) * base + w * colors
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def image_from_input(x: np.ndarray, mean=None, std=None) -> np.ndarray:
    """A [C, H, W] model input back to an RGB picture in [0, 1] (undoing mean/std)."""
    x = np.asarray(x, dtype=np.float64)
    if mean is not None and std is not None:
        x = x * np.asarray(std).reshape(-1, 1, 1) + np.asarray(mean).reshape(-1, 1, 1)
    img = np.moveaxis(x, 0, -1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    img = img[..., :3]
    lo, hi = img.min(), img.max()
    if lo < 0 or hi > 1:
        img = (img - lo) / (hi - lo + 1e-12)
    return img


def load_image(path, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3):
    """Read an image file → (model input [C, H, W] float32, RGB picture [H, W, 3] in [0, 1])."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            rgb = np.asarray(im, dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image '{path}': {e}") from e
    x = np.moveaxis(rgb, -1, 0)
    if channels == 1:
        x = x.mean(0, keepdims=True)
    x = (x - np.asarray(mean[:channels], np.float32).reshape(-1, 1, 1)) / \
        np.asarray(std[:channels], np.float32).reshape(-1, 1, 1)
    return x.astype(np.float32), rgb


def panel(image: np.ndarray, maps: dict[str, np.ndarray], title: str = "") -> np.ndarray:
    """[image | overlay per map] side by side with labels; uint8 RGB."""
    from PIL import Image, ImageDraw
    h, w = image.shape[:2]
    tiles = [("input", (np.clip(image, 0, 1) * 255).astype(np.uint8))]
    tiles += [(name, overlay(image, m)) for name, m in maps.items()]
    scale = max(1, 160 // max(h, w))
    th, tw = h * scale, w * scale
    label_h = 14
    canvas = Image.new("RGB", (len(tiles) * (tw + 4) + 4, th + label_h + (label_h if title else 0) + 6),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y0 = 2
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
        y0 += label_h
    for i, (name, tile) in enumerate(tiles):
        img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
        x = 4 + i * (tw + 4)
        canvas.paste(img, (x, y0 + label_h))
        draw.text((x, y0), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(array: np.ndarray, path) -> Path:
    """Write an RGB uint8 array as PNG atomically."""
    from PIL import Image
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), ".png")


def save_npy(array: np.ndarray, path) -> Path:
    """Write an array as .npy atomically."""
    return atomic_write(path, lambda tmp: np.save(tmp, array), ".npy")
