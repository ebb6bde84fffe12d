"""Image files → model inputs for a converted model: size, layout and normalization from its metadata.

Shared by the server, `explain-dataset` and the Ray engine so every path feeds the same numbers.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, OptionError
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
    normalization: str = "given"   # where mean/std came from: "given", "recorded" (convert), "imagenet"

    @classmethod
    def from_explainer(cls, ex, mean=None, std=None) -> "ImageInput":
        """mean/std, in order: the ones given, the ones `convert` recorded, ImageNet's."""
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
        picked = []
        for given, key, imagenet in ((mean, "mean", IMAGENET_MEAN), (std, "std", IMAGENET_STD)):
            if given:
                picked.append((tuple(given), "given"))
            elif pre.get(key):
                picked.append((tuple(pre[key]), "recorded"))
            else:
                picked.append((imagenet, "imagenet"))
        sources = {src for _, src in picked}
        source = "imagenet" if "imagenet" in sources else "recorded" if "recorded" in sources else "given"
        return cls(h, w, c, axis, picked[0][0], picked[1][0], source)

    def load(self, source, max_pixels: int = MAX_PIXELS, warn_aspect: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
        """A path or encoded bytes → (one model input without batch axis, RGB picture in [0, 1]).
        warn_aspect: warn when the image's aspect ratio differs from the model input's."""
        size = (self.height, self.width)
        if isinstance(source, (bytes, bytearray, memoryview)):
            checked = decoded_source(bytes(source), max_pixels)
            try:
                x, rgb = load_image(checked, size, self.mean, self.std, channels=self.channels,
                                    warn_aspect=warn_aspect)
            except InputError as e:
                raise InputError(f"cannot decode the image: {e.__cause__ or e}") from None
        else:
            x, rgb = load_image(source, size, self.mean, self.std, channels=self.channels,
                                warn_aspect=warn_aspect)
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


def region_mask(spec, size) -> np.ndarray:
    """A region for a dense output of spatial size [H, W], as a float32 0/1 mask [H, W]: a box
    "x0,y0,x1,y1" (or a 4-tuple; pixel columns x0..x1−1, rows y0..y1−1, clipped to the output)
    or a mask image file (nonzero = in; its size must be [H, W]: it is not resized)."""
    if len(size) != 2:
        raise InputError(f"a box or mask image is a 2-d region; the output's spatial size is {list(size)}")
    h, w = (int(d) for d in size)
    box = spec
    if isinstance(spec, str) and not Path(spec).is_file() and spec.count(",") == 3:
        try:
            box = tuple(int(v) for v in spec.split(","))
        except ValueError:
            raise InputError(f"region box '{spec}' is not four integers x0,y0,x1,y1") from None
    if isinstance(box, (tuple, list)):
        if len(box) != 4:
            raise InputError(f"a region box is x0,y0,x1,y1; got {box!r}")
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 and 0 <= y0 < y1 and x0 < w and y0 < h):
            raise InputError(f"region box {x0},{y0},{x1},{y1} is empty or outside the output's "
                             f"{w}x{h} positions (x0 < x1, y0 < y1, x0 < {w}, y0 < {h})")
        m = np.zeros((h, w), np.float32)
        m[y0:y1, x0:x1] = 1.0
        return m
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"region '{spec}' is neither a box x0,y0,x1,y1 nor a mask image file")
    from PIL import Image
    with Image.open(decoded_source(path.read_bytes())) as im:
        arr = np.asarray(im.convert("L"))
    if arr.shape != (h, w):
        raise InputError(f"region mask '{path.name}' is {arr.shape[1]}x{arr.shape[0]} pixels; the "
                         f"explained output is {w}x{h} (masks are not resized)")
    return (arr != 0).astype(np.float32)


def list_images(folder) -> list[Path]:
    """Image files under folder (recursive), in a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"no image folder at '{root}'")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# -- what a model's own folder says about it --------------------------------
def sidecar(model) -> tuple[Path | None, dict]:
    """`<stem>.json` beside a model file (what models/train_fixture.py writes): its path and
    the normalization and class names it records; (None, {}) when there is none."""
    if not isinstance(model, (str, os.PathLike)):
        return None, {}
    path = Path(model).with_suffix(".json")
    if not path.is_file():
        return None, {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"ignored {path}: not readable JSON ({e})", UserWarning, stacklevel=2)
        return None, {}
    if not isinstance(doc, dict):
        return None, {}
    norm = doc.get("normalization") if isinstance(doc.get("normalization"), dict) else doc
    found = {}
    for key in ("mean", "std"):
        v = norm.get(key)
        if isinstance(v, list) and v and all(isinstance(f, (int, float)) for f in v):
            found[key] = [float(f) for f in v]
    names = doc.get("class_names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        found["class_names"] = list(names)
    return path, found


def sidecar_options(model, mean=None, std=None) -> tuple[Path | None, dict, list[str]]:
    """What the source model's sidecar json adds to the conversion options: the normalization
    mean/std that were not given and the class names. Returns (sidecar path or None,
    {option: value} to set, notes for the conversion report). The optimize pass records them
    in the converted model's metadata (`dconnx.preprocess`, `dconnx.class_names`)."""
    path, found = sidecar(model)
    if path is None:
        return None, {}, []
    given = {"mean": mean, "std": std}
    taken = {k: tuple(found[k]) for k in ("mean", "std") if not given[k] and k in found}
    notes = []
    if taken:
        notes.append(f"input normalization {' and '.join(taken)} from {path.name}: "
                     + ", ".join(f"{k} {list(v)}" for k, v in taken.items()))
    if found.get("class_names"):
        taken["class_names"] = tuple(found["class_names"])
    return path, taken, notes


def read_labels(path) -> list[str]:
    """Class names from a file: a JSON list, or one name per line."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the labels file '{p}': {e}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"the labels file '{p}' starts like a JSON list but is not one: {e}") from None
        if not all(isinstance(n, (str, int, float)) for n in names):
            raise InputError(f"the labels file '{p}' must be a JSON list of names")
        names = [str(n) for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"the labels file '{p}' holds no class names")
    return names


def class_names(ex, labels=None) -> list[str] | None:
    """Class names of a converted model: from `labels` (a file) or recorded by convert; checked
    to be one per class."""
    if labels is not None:
        names, where = read_labels(labels), f"the labels file '{labels}'"
    elif "dconnx.class_names" in ex.meta:
        names, where = json.loads(ex.meta["dconnx.class_names"]), "the model's metadata"
    else:
        return None
    if isinstance(ex.n_classes, int) and len(names) != ex.n_classes:
        raise OptionError(f"{where} names {len(names)} classes; the model has {ex.n_classes}")
    return names


# -- one image file → a picture and raw maps (`dconnx explain`) ---------------
@dataclass(frozen=True)
class ImageExplanation:
    png: Path
    npy: tuple
    target: int
    logit: float
    class_name: str | None
    methods: tuple
    title: str


def select_methods(ex, methods=None) -> list[str]:
    """The model's map outputs, or the requested subset of them (comma list or sequence)."""
    if not ex.methods:
        raise OptionError("the model has no attribution outputs; convert it with --methods")
    if methods is None:
        return list(ex.methods)
    wanted = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in wanted if m not in ex.methods]
    if unknown or not wanted:
        what = f"method '{unknown[0]}' is not" if unknown else "no method is"
        raise OptionError(f"{what} an output of this model; available: {', '.join(ex.methods)}")
    return list(dict.fromkeys(wanted))


def explain_image(ex, image, output, *, target=None, alpha=None, methods=None, mean=None, std=None,
                  labels=None, cmap=None, overlay=None, region=None) -> ImageExplanation:
    """Explain one image file with a converted model (an Explainer): writes the panel PNG at
    `output` and the raw maps beside it (`<stem>.npy`, or `<stem>.<method>.npy` for several).

    Normalization: mean/std given, else the ones convert recorded, else ImageNet's (with a
    warning). labels: a file of class names (else the ones convert recorded)."""
    from .viz import OVERLAY_STRENGTH, PictureWarning, colormap, panel, save_npy, save_png
    chosen = select_methods(ex, methods)
    if cmap is not None:
        colormap(cmap)
    strength = OVERLAY_STRENGTH if overlay is None else float(overlay)
    if not 0.0 <= strength <= 1.0:
        raise OptionError(f"overlay strength {overlay} is outside [0, 1]")
    names = class_names(ex, labels)
    images = ImageInput.from_explainer(ex, mean, std)
    if images.normalization == "imagenet":
        warnings.warn("no input normalization given (--mean/--std) or recorded by convert: using "
                      f"ImageNet's (mean {list(images.mean)}, std {list(images.std)}); if the model was "
                      "trained otherwise, pass --mean/--std here or to convert", PictureWarning, stacklevel=2)
    x, rgb = images.load(image, warn_aspect=True)
    res = ex.maps(x[None], target=target, alpha=alpha, region=region)
    t = int(res.target[0])
    logit = float(res.scores[0, t])     # a dense output: the class summed over the region
    name = names[t] if names else None
    title = f"{Path(str(image)).name}: class {t}{f' {name!r}' if name else ''}, logit {logit:.3g}"
    maps = {m: res[m][0] for m in chosen}
    png = save_png(panel(rgb, maps, title, cmap=cmap, strength=strength), output)
    stem = png.with_suffix("")
    npy = tuple(save_npy(arr, Path(f"{stem}.npy") if len(maps) == 1 else Path(f"{stem}.{m}.npy"))
                for m, arr in maps.items())
    return ImageExplanation(png, npy, t, logit, name, tuple(maps), title)
