"""Heatmap pictures: colormaps, overlays on the input image, labelled panels with one colorbar
per map (numpy + Pillow).

A method's maps always get the same kind of colormap: a diverging one centred at 0 with
symmetric limits for signed methods (SplitGrad, gradient, SplitLRP, ...), a sequential one
for nonnegative methods (SplitCAM, GradCAM, LayerCAM) — never switched by the data's sign.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError, OptionError
from .io import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OVERLAY_STRENGTH = 0.65     # weight of the heatmap colour where the map is at its largest magnitude


class PictureWarning(UserWarning):
    """A picture is likely misleading: a distorted resize, a constant map."""


# -- colormaps --------------------------------------------------------------
@dataclass(frozen=True)
class Colormap:
    """Piecewise-linear RGB stops over t in [0, 1]; diverging maps have their centre at t = 0.5."""
    name: str
    kind: str                # "diverging" | "sequential"
    stops: tuple

    def __call__(self, t: np.ndarray) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
        stops = np.asarray(self.stops, dtype=np.float64)
        grid = np.linspace(0.0, 1.0, len(stops))
        return np.stack([np.interp(t, grid, stops[:, c]) for c in range(3)], -1)


COLORMAPS = {c.name: c for c in (
    Colormap("bwr", "diverging", ((0.05, 0.20, 0.80), (1.0, 1.0, 1.0), (0.80, 0.05, 0.05))),
    Colormap("coolwarm", "diverging", ((0.23, 0.30, 0.75), (0.55, 0.69, 1.00), (0.87, 0.87, 0.87),
                                       (0.96, 0.60, 0.48), (0.71, 0.02, 0.15))),
    Colormap("hot", "sequential", ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0))),
    Colormap("viridis", "sequential", ((0.267, 0.005, 0.329), (0.283, 0.141, 0.458), (0.254, 0.265, 0.530),
                                       (0.207, 0.372, 0.553), (0.164, 0.471, 0.558), (0.128, 0.567, 0.551),
                                       (0.135, 0.659, 0.518), (0.267, 0.749, 0.441), (0.478, 0.821, 0.318),
                                       (0.741, 0.873, 0.150), (0.993, 0.906, 0.144))),
)}
SIGNED_CMAP, NONNEGATIVE_CMAP = "bwr", "hot"


def colormap(name: str) -> Colormap:
    if name not in COLORMAPS:
        raise OptionError(f"unknown colormap '{name}'; available: {', '.join(COLORMAPS)}")
    return COLORMAPS[name]


def method_signed(name: str) -> bool:
    """Whether a method's maps can be negative (from the method registry; an output that names
    no registered method counts as signed)."""
    from .methods import METHODS
    method = METHODS.get(name.split("@")[0])
    return True if method is None else method.signed


@dataclass(frozen=True)
class MapStyle:
    """How one map is drawn: its colormap and the value range the colormap spans."""
    name: str
    cmap: str
    signed: bool
    vmin: float
    vmax: float

    @classmethod
    def of(cls, name: str, heat: np.ndarray, cmap: str | None = None, signed: bool | None = None,
           warn: bool = True) -> "MapStyle":
        """The style of a map by its method: symmetric limits around 0 for signed methods,
        [min(0, lowest), highest] for nonnegative ones. Warns when the map is constant."""
        heat = _finite(heat)
        signed = method_signed(name) if signed is None else signed
        cmap = colormap(cmap or (SIGNED_CMAP if signed else NONNEGATIVE_CMAP)).name
        lo, hi = float(heat.min()), float(heat.max())
        if lo == hi and warn:
            warnings.warn(f"the {name} map is constant (every value is {lo:g}); its overlay shows nothing",
                          PictureWarning, stacklevel=3)
        if signed:
            m = max(abs(lo), abs(hi))
            return cls(name, cmap, True, -m, m)
        return cls(name, cmap, False, min(lo, 0.0), max(hi, min(lo, 0.0)))

    def position(self, heat: np.ndarray) -> np.ndarray:
        """Values → t in [0, 1] along the colormap (0 sits at t = 0.5 for signed maps)."""
        span = self.vmax - self.vmin
        if span == 0:
            return np.full(np.shape(heat), 0.5 if self.signed else 0.0)
        return np.clip((np.asarray(heat, np.float64) - self.vmin) / span, 0.0, 1.0)

    def weight(self, heat: np.ndarray) -> np.ndarray:
        """How strongly each pixel shows: the magnitude relative to the largest one."""
        t = self.position(heat)
        return np.abs(2 * t - 1) if self.signed else t

    def colors(self, heat: np.ndarray) -> np.ndarray:
        return colormap(self.cmap)(self.position(heat))

    def ticks(self) -> list[float]:
        """Colorbar ticks, top to bottom."""
        if self.vmin == self.vmax:
            return [self.vmax]
        mid = 0.0 if self.signed else (self.vmin + self.vmax) / 2
        return [self.vmax, mid, self.vmin]


def _finite(heat) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float64)
    if not np.all(np.isfinite(heat)):
        raise InputError("the map contains NaN or Inf")
    return heat


# kept for callers that colour a map without knowing its method (by the data's sign)
def diverging(v: np.ndarray) -> np.ndarray:
    """Blue (negative) – white (0) – red (positive) for v in [−1, 1] → RGB in [0, 1]."""
    return COLORMAPS["bwr"]((np.clip(v, -1.0, 1.0) + 1) / 2)


def hot(v: np.ndarray) -> np.ndarray:
    """Black – red – yellow – white for v in [0, 1] → RGB in [0, 1]."""
    return COLORMAPS["hot"](v)


def colorize(heat: np.ndarray, name: str | None = None) -> np.ndarray:
    """RGB in [0, 1] of a map, styled by its method `name` (by its sign when None)."""
    heat = _finite(heat)
    signed = bool(np.any(heat < 0)) if name is None else None
    return MapStyle.of(name or "map", heat, signed=signed, warn=False).colors(heat)


def fit(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map at the picture's size (maps kept at a layer's resolution are resized bilinearly)."""
    heat = np.asarray(heat)
    if heat.shape == tuple(shape):
        return heat
    from PIL import Image
    return np.asarray(Image.fromarray(heat.astype(np.float32)).resize((shape[1], shape[0]), Image.BILINEAR))


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = OVERLAY_STRENGTH,
            style: MapStyle | None = None) -> np.ndarray:
    """The heatmap blended over an RGB image in [0, 1], weighted by its magnitude; uint8 [H, W, 3].
    style: how to colour it (default: diverging if it has negative values, else sequential)."""
    if not 0.0 <= float(strength) <= 1.0:
        raise OptionError(f"overlay strength {strength} is outside [0, 1]")
    heat = fit(_finite(heat), image.shape[:2])
    if style is None:
        style = MapStyle.of("map", heat, signed=bool(np.any(heat < 0)), warn=False)
    w = strength * style.weight(heat)[..., None] ** 0.5
    gray = image.mean(-1, keepdims=True) * np.ones(3)
    base = 0.35 * image + 0.65 * gray
    out = (1 - w) * base + w * style.colors(heat)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


# -- images -----------------------------------------------------------------
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


def load_image(path, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD, channels: int = 3,
               warn_aspect: bool = False):
    """Read an image file → (model input [C, H, W] float32, RGB picture [H, W, 3] in [0, 1]).
    warn_aspect: a PictureWarning when resizing to `size` changes the aspect ratio."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
            im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            rgb = np.asarray(im, dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image '{path}': {e}") from e
    if warn_aspect and abs((w0 / h0) / (size[1] / size[0]) - 1) > 0.01:
        name = f"'{path}'" if isinstance(path, (str, Path)) else "the image"
        warnings.warn(f"{name} is {w0}x{h0} (aspect {w0 / h0:.2f}); it is resized to the model's "
                      f"{size[1]}x{size[0]} (aspect {size[1] / size[0]:.2f}), which distorts it: crop it "
                      f"to the model's aspect ratio for an undistorted map", PictureWarning, stacklevel=2)
    x = np.moveaxis(rgb, -1, 0)
    if channels == 1:
        x = x.mean(0, keepdims=True)
    x = (x - np.asarray(mean[:channels], np.float32).reshape(-1, 1, 1)) / \
        np.asarray(std[:channels], np.float32).reshape(-1, 1, 1)
    return x.astype(np.float32), rgb


# -- panels -----------------------------------------------------------------
@lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:         # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text or " ")
    return right, bottom


def tick_label(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}"


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def overlaps(self, o: "Box") -> bool:
        return self.x < o.x + o.w and o.x < self.x + self.w and self.y < o.y + o.h and o.y < self.y + self.h


@dataclass(frozen=True)
class Tile:
    """One column of a panel: its label, its picture and, for a map, its colorbar and ticks."""
    name: str
    label: Box
    picture: Box
    style: MapStyle | None = None
    colorbar: Box | None = None
    ticks: tuple = ()          # (value, text, Box) top to bottom


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    title: str
    title_box: Box | None
    tiles: tuple

    def boxes(self) -> list[tuple[str, Box]]:
        """Every drawn element, for overlap checks."""
        out = [("title", self.title_box)] if self.title_box else []
        for t in self.tiles:
            out += [(f"{t.name} label", t.label), (f"{t.name} picture", t.picture)]
            if t.colorbar:
                out.append((f"{t.name} colorbar", t.colorbar))
            out += [(f"{t.name} tick {text}", box) for _, text, box in t.ticks]
        return out


FONT, TITLE_FONT, PAD, BAR_W = 12, 13, 6, 10
TICK_RESERVE = "-0.0888"    # tick room reserved beside each colorbar (longer ticks take more)


def layout(shape: tuple[int, int], styles: list[MapStyle], title: str = "") -> Layout:
    """Where everything goes: the input, then each map with its own colorbar and ticks."""
    h, w = shape
    scale = max(1, 160 // max(h, w))
    th, tw = h * scale, w * scale
    label_h = _text_size("Ag", FONT)[1] + 3
    y = PAD
    title_box = None
    if title:
        title_box = Box(PAD, y, *_text_size(title, TITLE_FONT))
        y += title_box.h + 4
    tiles, x = [], PAD
    for style in [None, *styles]:
        name = "input" if style is None else style.name
        label = Box(x, y, *_text_size(name, FONT))
        picture = Box(x, y + label_h, tw, th)
        right = x + max(tw, label.w)
        bar, ticks = None, ()
        if style is not None:
            bar = Box(x + tw + 4, picture.y, BAR_W, th)
            values = style.ticks()
            rows = np.linspace(picture.y, picture.y + th, len(values)) if len(values) > 1 else [picture.y + th / 2]
            placed = []
            for v, row in zip(values, rows):
                text = tick_label(v)
                tw_, th_ = _text_size(text, FONT)
                ty = int(np.clip(row - th_ / 2, picture.y - 2, picture.y + th - th_ + 2))
                placed.append((v, text, Box(bar.x + BAR_W + 3, ty, tw_, th_)))
            ticks = tuple(placed)
            # the same room for every colorbar's ticks, so the columns of stacked panels line up
            reserve = bar.x + BAR_W + 3 + _text_size(TICK_RESERVE, FONT)[0]
            right = max(right, reserve, max(b.x + b.w for _, _, b in ticks))
        tiles.append(Tile(name, label, picture, style, bar, ticks))
        x = right + 2 * PAD
    width = max(x - PAD, (title_box.x + title_box.w + PAD) if title_box else 0)
    return Layout(width, y + label_h + th + PAD, title, title_box, tuple(tiles))


def panel(image: np.ndarray, maps: dict[str, np.ndarray], title: str = "", *, cmap: str | None = None,
          strength: float = OVERLAY_STRENGTH) -> np.ndarray:
    """[image | overlay per map, each with its colorbar] side by side with labels; uint8 RGB.
    Maps are styled by the method their name gives (MapStyle.of); cmap overrides the colormap."""
    from PIL import Image, ImageDraw
    maps = {name: fit(_finite(m), image.shape[:2]) for name, m in maps.items()}
    styles = []
    for name, m in maps.items():      # a loop, not a comprehension: warnings point at panel's caller
        styles.append(MapStyle.of(name, m, cmap))
    lay = layout(image.shape[:2], styles, title)
    canvas = Image.new("RGB", (lay.width, lay.height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if lay.title_box:
        draw.text((lay.title_box.x, lay.title_box.y), title, fill=(0, 0, 0), font=_font(TITLE_FONT))
    for tile in lay.tiles:
        draw.text((tile.label.x, tile.label.y), tile.name, fill=(0, 0, 0), font=_font(FONT))
        if tile.style is None:
            rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        else:
            rgb = overlay(image, maps[tile.name], strength, tile.style)
        pic = tile.picture
        canvas.paste(Image.fromarray(rgb).resize((pic.w, pic.h), Image.NEAREST), (pic.x, pic.y))
        if tile.colorbar:
            bar = tile.colorbar
            t = np.linspace(1.0, 0.0, bar.h)[:, None] * np.ones(bar.w)    # top = the largest value
            colors = (colormap(tile.style.cmap)(t) * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(colors), (bar.x, bar.y))
            draw.rectangle([bar.x - 1, bar.y - 1, bar.x + bar.w, bar.y + bar.h], outline=(90, 90, 90))
            for _, text, box in tile.ticks:
                draw.text((box.x, box.y), text, fill=(0, 0, 0), font=_font(FONT))
    return np.asarray(canvas)


def save_png(array: np.ndarray, path) -> Path:
    """Write an RGB uint8 array as PNG atomically."""
    from PIL import Image
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", optimize=True), ".png")


def save_npy(array: np.ndarray, path) -> Path:
    """Write an array as .npy atomically."""
    return atomic_write(path, lambda tmp: np.save(tmp, array), ".npy")
