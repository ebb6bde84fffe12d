"""Data sets for `dconnx eval`: the synthetic planted-evidence benchmark, photos shipped
with scikit-image (no download), a folder of images, or an ``.npz`` file."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import synthetic

# Colour photographs in scikit-image's data folder (shipped with the package).
PHOTO_FILES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
               "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Dataset:
    """``x`` normalized model input [N, C, H, W] float32; ``rgb`` pictures [N, H, W, 3] in
    [0, 1] (for display); ``y`` int64 labels or None (explain the argmax); ``masks`` bool
    [N, H, W] ground-truth object masks or None (no localization metrics)."""
    name: str
    x: np.ndarray
    rgb: np.ndarray
    y: np.ndarray | None = None
    masks: np.ndarray | None = None
    names: list | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def subset(self, n: int | None) -> "Dataset":
        if n is None or n >= len(self.x):
            return self
        pick = slice(0, n)
        return Dataset(self.name, self.x[pick], self.rgb[pick],
                       None if self.y is None else self.y[pick],
                       None if self.masks is None else self.masks[pick],
                       None if self.names is None else self.names[pick], self.mean, self.std)


def _normalize(rgb01: np.ndarray, mean, std) -> np.ndarray:
    """[N, H, W, 3] in [0, 1] -> [N, 3, H, W] normalized float32."""
    x = np.moveaxis(np.asarray(rgb01, np.float32), -1, 1)
    return ((x - np.asarray(mean, np.float32).reshape(1, -1, 1, 1)) /
            np.asarray(std, np.float32).reshape(1, -1, 1, 1)).astype(np.float32)


def synthetic_set(n: int, *, size: int = 64, n_classes: int = 4, seed: int = 1,
                  clutter: bool = True) -> Dataset:
    """`synthetic.make_dataset` (seed 1 = the fixture model's test set)."""
    x, y, masks = synthetic.make_dataset(n, size=size, n_classes=n_classes, seed=seed, clutter=clutter)
    rgb = np.moveaxis(synthetic.denormalize(x), 1, -1)
    return Dataset("synthetic", x, rgb, y, masks, None,
                   tuple(float(v) for v in synthetic.MEAN), tuple(float(v) for v in synthetic.STD))


def photo_dir() -> Path:
    """scikit-image's data folder (the package must be installed: extra ``eval``)."""
    import importlib.util
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the photo set needs scikit-image (pip install 'dconnx[eval]')")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _square(im, size: int):
    from PIL import Image
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def photos(size: int = 64) -> tuple[np.ndarray, list[str]]:
    """The colour photographs scikit-image ships, centre-cropped and resized: [N, size,
    size, 3] in [0, 1] and their names."""
    from PIL import Image
    folder = photo_dir()
    out, names = [], []
    for f in PHOTO_FILES:
        p = folder / f
        if not p.is_file():
            continue
        with Image.open(p) as im:
            out.append(np.asarray(_square(im.convert("RGB"), size), np.float32) / 255.0)
        names.append(p.stem)
    if not out:
        raise InputError(f"no photos found in {folder}")
    return np.stack(out), names


def photo_set(size: int = 64, mean=None, std=None) -> Dataset:
    """The photos as a data set without labels or masks (maps of the argmax class)."""
    rgb, names = photos(size)
    mean = tuple(mean or synthetic.MEAN)
    std = tuple(std or synthetic.STD)
    return Dataset("photos", _normalize(rgb, mean, std), rgb, None, None, names, mean, std)


def planted_photo_set(n: int, *, size: int = 64, n_classes: int = 4, seed: int = 0) -> Dataset:
    """Real-photo backgrounds (random crops of scikit-image's photos) with one planted
    object of the synthetic benchmark's classes, drawn as `synthetic` draws its main
    object; the object's pixels are the mask. No distractors."""
    from PIL import Image
    folder = photo_dir()
    sources = []
    for f in PHOTO_FILES:
        p = folder / f
        if p.is_file():
            with Image.open(p) as im:
                sources.append(im.convert("RGB").copy())
    if not sources:
        raise InputError(f"no photos found in {folder}")
    rng = np.random.default_rng([seed, 7])
    bg = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        src = sources[int(rng.integers(len(sources)))]
        w, h = src.size
        s = int(min(w, h) * rng.uniform(0.3, 1.0))
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = src.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
        bg[i] = np.asarray(crop, np.float32) / 255.0
    img = np.moveaxis(bg, -1, 1).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    r = rng.uniform(*synthetic._MAIN_RADIUS, n).astype(np.float32) * size
    cy = rng.uniform(r + 1, size - r - 1).astype(np.float32)
    cx = rng.uniform(r + 1, size - r - 1).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    base = img.mean(axis=(2, 3))
    col = synthetic._contrast_color(rng, base, n)
    alpha = rng.uniform(*synthetic._MAIN_ALPHA, n).astype(np.float32)
    fill, masks = synthetic._render(labels, cy, cx, r, theta, yy, xx, n_classes)
    a = (fill * alpha[:, None, None])[:, None]
    img = np.clip(img * (1 - a) + a * col[:, :, None, None], 0, 1)
    rgb = np.moveaxis(img, 1, -1).astype(np.float32)
    mean, std = tuple(float(v) for v in synthetic.MEAN), tuple(float(v) for v in synthetic.STD)
    return Dataset("planted-photos", _normalize(rgb, mean, std), rgb, labels, masks, None, mean, std)


def folder_set(path, size: tuple[int, int], mean, std, n: int | None = None) -> Dataset:
    """Images in a folder (sorted by name). Optional: ``masks/<stem>.png`` (nonzero =
    object) and ``labels.csv`` with rows ``filename,label``."""
    from PIL import Image
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if n is not None:
        files = files[:n]
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    rgb = np.empty((len(files), size[0], size[1], 3), np.float32)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            rgb[i] = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR),
                                np.float32) / 255.0
    labels = None
    lab_file = folder / "labels.csv"
    if lab_file.is_file():
        table = {}
        with open(lab_file, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 2 and row[1].strip().lstrip("-").isdigit():
                    table[row[0].strip()] = int(row[1])
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise InputError(f"labels.csv has no label for {', '.join(missing[:5])}")
        labels = np.asarray([table[f.name] for f in files], np.int64)
    masks = None
    mask_dir = folder / "masks"
    if mask_dir.is_dir():
        masks = np.zeros((len(files), size[0], size[1]), bool)
        for i, f in enumerate(files):
            cand = [mask_dir / (f.stem + s) for s in IMAGE_SUFFIXES]
            found = next((c for c in cand if c.is_file()), None)
            if found is None:
                raise InputError(f"no mask for '{f.name}' in '{mask_dir}'")
            with Image.open(found) as im:
                masks[i] = np.asarray(im.convert("L").resize((size[1], size[0]), Image.NEAREST)) > 0
    return Dataset(folder.name, _normalize(rgb, mean, std), rgb, labels, masks,
                   [f.name for f in files], tuple(mean), tuple(std))


def npz_set(path, mean, std, n: int | None = None) -> Dataset:
    """An ``.npz`` with ``x`` (normalized input [N, C, H, W]) or ``images`` ([N, H, W, 3]
    in [0, 1] or uint8), and optionally ``y``/``labels`` and ``masks`` [N, H, W]."""
    with np.load(path) as z:
        keys = set(z.files)
        if "x" in keys:
            x = np.asarray(z["x"], np.float32)
            rgb = np.moveaxis(x, 1, -1)
            if mean is not None and std is not None:
                rgb = rgb * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
            lo, hi = rgb.min(), rgb.max()
            rgb = np.clip(rgb, 0, 1) if lo >= 0 and hi <= 1 else (rgb - lo) / (hi - lo + 1e-12)
        elif "images" in keys:
            img = z["images"]
            rgb = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
            x = _normalize(rgb, mean, std)
        else:
            raise InputError(f"'{path}' has neither 'x' nor 'images' (keys: {', '.join(sorted(keys))})")
        y = z["y"] if "y" in keys else (z["labels"] if "labels" in keys else None)
        masks = z["masks"].astype(bool) if "masks" in keys else None
    ds = Dataset(Path(path).stem, x, rgb.astype(np.float32), None if y is None else np.asarray(y, np.int64),
                 masks, None, None if mean is None else tuple(mean), None if std is None else tuple(std))
    return ds.subset(n)


def load(spec: str, *, input_shape, n_classes: int, n: int | None = None, seed: int = 1,
         mean=None, std=None) -> Dataset:
    """``synthetic`` | ``photos`` | ``planted-photos`` | a folder | an ``.npz`` file."""
    size = (int(input_shape[2]), int(input_shape[3]))
    if spec == "synthetic":
        if size[0] != size[1]:
            raise InputError(f"the synthetic set is square; the model takes {size}")
        return synthetic_set(256 if n is None else n, size=size[0], n_classes=n_classes, seed=seed)
    if spec == "planted-photos":
        return planted_photo_set(256 if n is None else n, size=size[0], n_classes=n_classes, seed=seed)
    if spec == "photos":
        return photo_set(size[0], mean, std).subset(n)
    p = Path(spec)
    from ..viz import IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(mean) if mean else IMAGENET_MEAN
    std = tuple(std) if std else IMAGENET_STD
    if p.is_dir():
        return folder_set(p, size, mean, std, n)
    if p.is_file() and p.suffix == ".npz":
        return npz_set(p, mean, std, n)
    raise InputError(f"--data '{spec}' is not synthetic, photos, planted-photos, a folder or an .npz file")
