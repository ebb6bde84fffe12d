"""Synthetic localization benchmark: planted class evidence with ground-truth masks.

Needs no download and only numpy. Each image has

* a textured, cluttered background: a base colour with a linear gradient,
  an oriented sinusoidal grating, smooth colour blobs, faint rectangles and
  pixel noise;
* ONE object of its class (a distinctive shape / texture: cross, ring,
  checker patch, triangle, ...) at a random position, scale, rotation and
  colour, drawn with high contrast against the background; its pixels form
  the ground-truth mask;
* 1-2 distractor objects of OTHER classes, deliberately smaller (about half
  the size) and fainter (semi-transparent), so the label is decided by the
  dominant object but an attribution map that lights up every shape is
  penalised.

Generation is vectorized over chunks of CHUNK images; chunk ``c`` of a data
set with seed ``s`` uses ``numpy.random.default_rng([s, c])``, so the data is
deterministic for a seed and ``make_dataset(m, seed=s)`` is a prefix of
``make_dataset(n, seed=s)`` for m <= n.
"""
from __future__ import annotations

import numpy as np

CLASS_NAMES = ("cross", "ring", "checker", "triangle", "diamond", "bars")

# Statistics of the [0, 1] images (measured on make_dataset output, size 64,
# 4 classes: per-channel means 0.451-0.461, stds 0.235-0.237); images are
# returned as (x - MEAN) / STD.
MEAN = np.array([0.455, 0.455, 0.455], dtype=np.float32)
STD = np.array([0.236, 0.236, 0.236], dtype=np.float32)

CHUNK = 256

# object geometry, as fractions of the image size
_MAIN_RADIUS = (0.16, 0.25)      # main object radius range
_DISTRACTOR_SCALE = (0.4, 0.6)   # distractor radius relative to the main object's
_MAIN_ALPHA = (0.85, 1.0)
_DISTRACTOR_ALPHA = (0.3, 0.55)


def normalize(images01: np.ndarray) -> np.ndarray:
    """[n, 3, H, W] images in [0, 1] -> normalized float32 network input."""
    return ((images01 - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def denormalize(images: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`, clipped to [0, 1] (for display)."""
    return np.clip(images * STD[:, None, None] + MEAN[:, None, None], 0.0, 1.0)


def make_dataset(n: int, *, size: int = 64, n_classes: int = 4, seed: int = 0,
                 clutter: bool = True):
    """Generate `n` images with planted class evidence.

    Returns (images, labels, masks):
      images float32 [n, 3, size, size]: rendered in [0, 1], then normalized
             with MEAN/STD to roughly zero mean / unit std (see `denormalize`);
      labels int64 [n] in [0, n_classes);
      masks  bool [n, size, size]: the pixels of the object of the image's class.
    clutter=False gives a plain, lightly noisy background and no distractors.
    """
    if not 2 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes must be in [2, {len(CLASS_NAMES)}], not {n_classes}")
    if size < 16:
        raise ValueError(f"size must be >= 16, not {size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    images = np.empty((n, 3, size, size), dtype=np.float32)
    labels = np.empty((n,), dtype=np.int64)
    masks = np.empty((n, size, size), dtype=bool)
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, c])
        img, lab, msk = _make_chunk(rng, CHUNK, size, n_classes, clutter)
        stop = min(n, start + CHUNK)
        images[start:stop] = normalize(img[: stop - start])
        labels[start:stop] = lab[: stop - start]
        masks[start:stop] = msk[: stop - start]
    return images, labels, masks


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------
def _shape(cls: int, u: np.ndarray, v: np.ndarray):
    """Shape `cls` in object coordinates (u, v) (unit radius, rotated).

    Returns (fill, mask): fill in [0, 1] is the opacity pattern (texture),
    mask the object's support.
    """
    name = CLASS_NAMES[cls]
    au, av = np.abs(u), np.abs(v)
    if name == "cross":
        m = ((au < 0.3) & (av < 1.0)) | ((av < 0.3) & (au < 1.0))
        return m.astype(np.float32), m
    if name == "ring":
        rho = np.sqrt(u * u + v * v)
        m = (rho < 1.0) & (rho > 0.55)
        return m.astype(np.float32), m
    if name == "checker":
        s = 0.85  # half side of the square patch (inscribed-ish in the unit circle)
        m = (au < s) & (av < s)
        cell = (np.floor((u + s) * 2.0 / s).astype(np.int64) +
                np.floor((v + s) * 2.0 / s).astype(np.int64)) % 2 == 0
        fill = np.where(m, np.where(cell, 1.0, 0.25), 0.0).astype(np.float32)
        return fill, m
    if name == "triangle":
        # equilateral triangle inscribed in the unit circle: three half planes
        m = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + np.pi / 3 + k * 2 * np.pi / 3
            m &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return m.astype(np.float32), m
    if name == "diamond":
        d = au + av
        m = (d < 1.0) & (d > 0.45)  # hollow diamond
        return m.astype(np.float32), m
    if name == "bars":
        m = (au < 0.9) & (av < 0.9) & ((np.floor((v + 0.9) / 0.36).astype(np.int64) % 2) == 0)
        return m.astype(np.float32), m
    raise AssertionError(name)


def _render(cls, cy, cx, r, theta, yy, xx, n_classes):
    """Objects of classes cls [B] at (cy, cx) [B] with radius r [B], rotation theta [B].

    Returns fill [B, H, W] float32 and mask [B, H, W] bool.
    """
    B = cls.shape[0]
    H, W = yy.shape
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / r[:, None, None]
    dx = (xx[None] - cx[:, None, None]) / r[:, None, None]
    u = (c * dy - s * dx).astype(np.float32)
    v = (s * dy + c * dx).astype(np.float32)
    fill = np.zeros((B, H, W), dtype=np.float32)
    mask = np.zeros((B, H, W), dtype=bool)
    for k in range(n_classes):
        idx = np.nonzero(cls == k)[0]
        if idx.size:
            f, m = _shape(k, u[idx], v[idx])
            fill[idx], mask[idx] = f, m
    return fill, mask


def _contrast_color(rng, base, B):
    """Saturated random colours that contrast in brightness with the background base colour."""
    col = rng.uniform(0.0, 1.0, (B, 3)).astype(np.float32)
    dark_bg = base.mean(axis=1, keepdims=True) < 0.5
    return np.where(dark_bg, 0.55 + 0.45 * col, 0.45 * col)


def _make_chunk(rng, B, size, n_classes, clutter):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    f = np.float32

    # ---- background
    base = rng.uniform(0.15, 0.85, (B, 3)).astype(f)
    img = np.broadcast_to(base[:, :, None, None], (B, 3, size, size)).copy()
    if clutter:
        # linear gradient
        g_ang = rng.uniform(0, 2 * np.pi, B).astype(f)
        g_amp = rng.uniform(0.0, 0.2, B).astype(f)
        ramp = ((np.cos(g_ang)[:, None, None] * yy + np.sin(g_ang)[:, None, None] * xx) / size - 0.5)
        img += (g_amp[:, None, None] * ramp)[:, None]
        # oriented grating (stripes)
        s_ang = rng.uniform(0, np.pi, B).astype(f)
        s_freq = rng.uniform(2.0, 8.0, B).astype(f)   # cycles per image
        s_phase = rng.uniform(0, 2 * np.pi, B).astype(f)
        s_col = rng.uniform(-0.12, 0.12, (B, 3)).astype(f)
        proj = (np.cos(s_ang)[:, None, None] * yy + np.sin(s_ang)[:, None, None] * xx) / size
        grating = np.sin(2 * np.pi * s_freq[:, None, None] * proj + s_phase[:, None, None])
        img += s_col[:, :, None, None] * grating[:, None]
        # smooth colour blobs
        K = 4
        b_cy = rng.uniform(0, size, (B, K, 1, 1)).astype(f)
        b_cx = rng.uniform(0, size, (B, K, 1, 1)).astype(f)
        b_sig = rng.uniform(0.05, 0.16, (B, K, 1, 1)).astype(f) * size
        b_col = rng.uniform(-0.35, 0.35, (B, K, 3)).astype(f)
        blob = np.exp(-((yy - b_cy) ** 2 + (xx - b_cx) ** 2) / (2 * b_sig ** 2))  # [B,K,H,W]
        img += np.einsum("bkc,bkhw->bchw", b_col, blob, optimize=True)
        # faint axis-aligned rectangles
        R = 3
        r_y0 = rng.uniform(0, size, (B, R, 1, 1)).astype(f)
        r_x0 = rng.uniform(0, size, (B, R, 1, 1)).astype(f)
        r_h = rng.uniform(0.05, 0.3, (B, R, 1, 1)).astype(f) * size
        r_w = rng.uniform(0.05, 0.3, (B, R, 1, 1)).astype(f) * size
        r_col = rng.uniform(-0.15, 0.15, (B, R, 3)).astype(f)
        rect = ((yy >= r_y0) & (yy < r_y0 + r_h) & (xx >= r_x0) & (xx < r_x0 + r_w)).astype(f)
        img += np.einsum("bkc,bkhw->bchw", r_col, rect, optimize=True)
    np.clip(img, 0.0, 1.0, out=img)

    labels = rng.integers(0, n_classes, B).astype(np.int64)

    # ---- main object geometry (fully inside the image)
    r_main = rng.uniform(*_MAIN_RADIUS, B).astype(f) * size
    cy = rng.uniform(r_main + 1, size - r_main - 1).astype(f)
    cx = rng.uniform(r_main + 1, size - r_main - 1).astype(f)
    theta = rng.uniform(0, 2 * np.pi, B).astype(f)

    # ---- distractors: other classes, smaller and fainter, drawn first
    if clutter:
        n_dis = rng.integers(1, 3, B)
        for j in range(2):
            d_cls = (labels + rng.integers(1, n_classes, B)) % n_classes
            d_r = (r_main * rng.uniform(*_DISTRACTOR_SCALE, B)).astype(f)
            # a few candidate centres; take the first that does not overlap the main object
            cand_y = rng.uniform(d_r[:, None] + 1, size - d_r[:, None] - 1, (B, 8)).astype(f)
            cand_x = rng.uniform(d_r[:, None] + 1, size - d_r[:, None] - 1, (B, 8)).astype(f)
            free = np.hypot(cand_y - cy[:, None], cand_x - cx[:, None]) > (r_main + d_r)[:, None]
            pick = np.argmax(free, axis=1)  # 0 when no candidate is free
            d_cy = cand_y[np.arange(B), pick]
            d_cx = cand_x[np.arange(B), pick]
            d_theta = rng.uniform(0, 2 * np.pi, B).astype(f)
            d_alpha = rng.uniform(*_DISTRACTOR_ALPHA, B).astype(f)
            d_col = _contrast_color(rng, base, B)
            fill, _ = _render(d_cls, d_cy, d_cx, d_r, d_theta, yy, xx, n_classes)
            a = (fill * (d_alpha * (n_dis > j))[:, None, None])[:, None]
            img = img * (1 - a) + a * d_col[:, :, None, None]

    # ---- main object on top
    alpha = rng.uniform(*_MAIN_ALPHA, B).astype(f)
    col = _contrast_color(rng, base, B)
    fill, masks = _render(labels, cy, cx, r_main, theta, yy, xx, n_classes)
    a = (fill * alpha[:, None, None])[:, None]
    img = img * (1 - a) + a * col[:, :, None, None]

    # ---- pixel noise over everything
    sigma = (rng.uniform(0.02, 0.08, B) if clutter else np.full(B, 0.02)).astype(f)
    img += sigma[:, None, None, None] * rng.standard_normal(img.shape, dtype=f)
    np.clip(img, 0.0, 1.0, out=img)
    return img.astype(f), labels, masks
