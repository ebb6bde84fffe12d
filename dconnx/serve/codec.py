"""Request bodies → checked arrays and options; results → JSON (base64 arrays, PNG overlays).

No web framework here: the app hands over bytes, dicts and strings, so this is plain to test.
Every refusal is an InputError or OptionError with a message meant for the client.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, OptionError

FORMATS = ("array", "png", "both")


class Malformed(InputError):
    """The body cannot be read at all (bad JSON, base64 or image file): 400 rather than 422."""


class TooLarge(InputError):
    """A body or image that would need more memory than one request may use: 413."""


# -- limits checked on the raw bytes, before anything is parsed or decoded ------------------
MAX_JSON_DEPTH = 32        # nesting of arrays and objects (an input needs its ndim + 2)
MAX_SHAPE_DIMS = 16        # dimensions of an encoded array's "shape"
JSON_SLACK = 4096          # values beyond the inputs' own (options, target lists, ...)
IMAGE_FACTOR = 64          # an upload may decode to this many times one input's float32 bytes
MIN_IMAGE_BYTES = 48 << 20 # ... or to 48 MiB (4096 x 4096 RGB), whichever is larger


MAX_TOKEN_CHARS = 256      # characters between two delimiters: one number with its whitespace
MAX_ESCAPES = 4096         # backslashes in one body (base64 and options need none)
_STRUCT = np.zeros(256, dtype=bool)
_STRUCT[np.frombuffer(b'[]{},:"', dtype=np.uint8)] = True


@dataclass(frozen=True)
class Limits:
    """What one request may cost, derived from the model's input (see json_guard, image_guard)."""
    input_elements: int        # elements of one sample
    max_samples: int           # samples in one request
    region_elements: int = 0   # elements of one region mask (dense models; 0 otherwise)

    @property
    def max_values(self) -> int:
        return (self.input_elements + self.region_elements) * self.max_samples + JSON_SLACK

    @property
    def max_image_bytes(self) -> int:
        return max(IMAGE_FACTOR * self.input_elements * 4, MIN_IMAGE_BYTES)


def json_guard(body: bytes, limits: Limits) -> None:
    """Refuse a JSON body whose parse would cost more than its inputs can need, before parsing.

    Checked on the bytes with vectorized scans over the structural characters only (strings
    and their escapes honoured): the number of values (commas and brackets) against
    `limits.max_values`, the nesting depth against MAX_JSON_DEPTH and the length of every token
    between delimiters (a number, true/false/null and the whitespace around it) against
    MAX_TOKEN_CHARS. So json.loads never builds more Python objects than one request's inputs
    need (about 32 bytes each), never recurses deeply and never converts a huge integer.
    """
    arr = np.frombuffer(body, dtype=np.uint8)
    if arr.size == 0:
        return
    struct = _STRUCT[arr]
    n_struct = int(np.count_nonzero(struct))
    if n_struct > 3 * limits.max_values + JSON_SLACK:
        raise TooLarge(f"the JSON body has {n_struct} brackets, commas, colons and quotes; one request of this "
                       f"model needs at most {3 * limits.max_values + JSON_SLACK} "
                       f"({limits.max_samples} samples of {limits.input_elements} values)")
    pos = np.flatnonzero(struct)
    chars = arr[pos]
    is_quote = chars == 34
    if is_quote.any():
        n_backslash = int(np.count_nonzero(arr == 92))
        if n_backslash > MAX_ESCAPES:
            raise Malformed(f"the JSON body has {n_backslash} backslashes; at most {MAX_ESCAPES} are accepted")
        if n_backslash:
            for i in np.flatnonzero(is_quote):
                j = int(pos[i]) - 1
                while j >= 0 and arr[j] == 92:
                    j -= 1
                if (int(pos[i]) - 1 - j) % 2:       # an odd run of backslashes: an escaped quote
                    is_quote[i] = False
        qpos = pos[is_quote]
        rank = np.searchsorted(qpos, pos)           # real quotes strictly before each position
        keep = is_quote | (rank % 2 == 0)           # quotes, and the delimiters outside strings
        pos, chars, is_quote = pos[keep], chars[keep], is_quote[keep]
        opening = np.zeros(pos.shape, dtype=bool)
        opening[np.flatnonzero(is_quote)[0::2]] = True
    else:
        opening = np.zeros(pos.shape, dtype=bool)
    opens = (chars == 91) | (chars == 123)
    closes = (chars == 93) | (chars == 125)
    values = int(np.count_nonzero(chars == 44)) + int(np.count_nonzero(opens))
    if values > limits.max_values:
        raise TooLarge(f"the JSON body holds about {values} values; one request of this model needs at most "
                       f"{limits.max_values} ({limits.max_samples} samples of {limits.input_elements})")
    if opens.any():
        deepest = int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max())
        if deepest > MAX_JSON_DEPTH:
            raise Malformed(f"the JSON body is nested {deepest} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    edges = np.concatenate(([-1], pos, [arr.size]))
    gaps = np.diff(edges) - 1
    gaps[1:][opening] = 0                           # the inside of a string is not a token
    longest = int(gaps.max())
    if longest > MAX_TOKEN_CHARS:
        raise Malformed(f"a token (number, literal or whitespace) of {longest} characters; at most "
                        f"{MAX_TOKEN_CHARS} are accepted")


ARRAY_DTYPES = ("float32", "float64", "float16")


@dataclass
class Request:
    """One checked request: a batched model input and the options that go with it."""
    x: np.ndarray                     # [n, ...] float32, validated against the model
    target: np.ndarray | None         # int64 [n] (-1 = argmax) or None (the model's default)
    alpha: float | None
    methods: list[str]
    format: str = "array"
    pictures: list = field(default_factory=list)   # RGB pictures when the inputs were images
    region: "Region | None" = None    # dense models: the positions the class is summed over

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def encode_array(a: np.ndarray) -> dict:
    """A little-endian base64 array with its dtype and shape."""
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape),
            "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}


def decode_array(obj, name: str = "'inputs'") -> np.ndarray:
    """Nested lists, or {"b64": ..., "dtype": ..., "shape": [...]} (little-endian), → float array.
    name: what the array is, in error messages."""
    if isinstance(obj, dict):
        missing = [k for k in ("b64", "shape") if k not in obj]
        if missing:
            raise InputError(f"an encoded array needs 'b64', 'shape' and optionally 'dtype'; missing {missing}")
        dtype = obj.get("dtype", "float32")
        if dtype not in ARRAY_DTYPES:
            raise InputError(f"dtype '{dtype}' is not one of {', '.join(ARRAY_DTYPES)}")
        shape = obj["shape"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputError(f"shape must be a list of nonnegative integers, got {str(shape)[:200]}")
        if len(shape) > MAX_SHAPE_DIMS:
            raise InputError(f"shape has {len(shape)} dimensions; at most {MAX_SHAPE_DIMS} are accepted")
        if not isinstance(obj["b64"], str):
            raise Malformed("'b64' must be a base64 string")
        try:
            raw = base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise Malformed(f"'b64' is not valid base64: {e}") from None
        dt = np.dtype(dtype).newbyteorder("<")
        want = math.prod(shape) * dt.itemsize
        if len(raw) != want:
            raise InputError(f"'b64' holds {len(raw)} bytes; shape {shape} of {dtype} needs {want}")
        return np.frombuffer(raw, dtype=dt).reshape(shape).astype(dtype)
    try:
        a = np.asarray(obj, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be a (nested) list of numbers or an encoded array: {e}") from None
    return a


def png_b64(rgb: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parse_json_body(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Malformed(f"the body is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:     # over-long integers, nesting (json_guard refuses both first)
        raise Malformed(f"the body is not usable JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise Malformed("the JSON body must be an object, e.g. {\"inputs\": ...}")
    return obj


def _ints(value, name: str) -> np.ndarray | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise InputError(f"{name} must be an integer or a list of integers, got {value!r}")
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer or a list of integers, got {value!r}") from None
    if arr.ndim != 1 or not np.all(arr == np.round(arr)):
        raise InputError(f"{name} must be an integer or a list of integers, got {value!r}")
    return arr.astype(np.int64)


def parse_options(ex, opts: dict, n: int, route: str) -> tuple:
    """(target [n] or None, alpha or None, methods, format) from JSON, form or query values."""
    target = _ints(opts.get("target"), "target")
    if target is not None:
        if not ex.accepts_target:
            raise OptionError("this model has no target input (it was converted without methods)")
        if target.shape[0] not in (1, n):
            raise InputError(f"target must be one class or one per sample ({n}), got {target.shape[0]}")
        if np.any(target < -1) or np.any(target >= ex.n_classes):
            raise InputError(f"target {target.tolist()} outside 0..{ex.n_classes - 1} (or -1 for argmax)")
        target = np.broadcast_to(target, (n,)).copy()
    alpha = opts.get("alpha")
    if alpha is not None and alpha != "":
        try:
            if isinstance(alpha, (bool, list, dict)):
                raise TypeError
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise InputError(f"alpha must be a number, got {alpha!r}") from None
        if not ex.accepts_alpha:
            raise OptionError("this model has no alpha input")
        if not 0.0 <= alpha <= 0.5:
            raise InputError(f"alpha={alpha} is outside [0, 0.5]")
    else:
        alpha = None
    methods = opts.get("methods")
    if methods is None or methods == "":
        methods = list(ex.methods)
    else:
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise InputError(f"methods must be a list of names or a comma list, got {methods!r}")
        unknown = [m for m in methods if m not in ex.methods]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; this model has "
                             f"{', '.join(ex.methods) or 'none'}")
    if route == "explain" and not methods:
        raise OptionError("this model has no attribution outputs; convert it with --methods")
    fmt = opts.get("format") or "array"
    if fmt not in FORMATS:
        raise InputError(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    return target, alpha, methods, fmt


@dataclass
class Region:
    """A checked region of a dense model: the mask the model takes, and what the client sent."""
    mask: np.ndarray                  # float32 [n, *output spatial]
    kind: str                         # "box" or "mask"
    box: list | None = None           # [x0, y0, x1, y1] in model-input pixels, for a box

    def describe(self) -> dict:
        return {"kind": self.kind, "box": self.box,
                "positions": self.mask.reshape(self.mask.shape[0], -1).sum(1).tolist()}


def _box_values(value) -> list | None:
    """The four numbers of a box given as "x0,y0,x1,y1" or a flat list of four; None if not a box."""
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) != 4:
            return None
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise InputError(f"region box '{value[:100]}' is not four integers x0,y0,x1,y1") from None
    if isinstance(value, list) and len(value) == 4 and not any(isinstance(v, (list, dict)) for v in value):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise InputError(f"region box {str(value)[:100]} is not four integers x0,y0,x1,y1")
        return [float(v) for v in value]
    return None


def box_mask(box: list, input_hw: tuple, output_hw: tuple) -> np.ndarray:
    """A 0/1 mask of the output's positions under a box [x0, y0, x1, y1] of model-input pixels
    (columns x0..x1-1, rows y0..y1-1). When the output is smaller than the input, every output
    position whose cell overlaps the box is in."""
    if not all(math.isfinite(v) and v == round(v) for v in box):
        raise InputError(f"region box {box} must be four integers x0,y0,x1,y1 (model-input pixels)")
    x0, y0, x1, y1 = (int(v) for v in box)
    (hi, wi), (ho, wo) = input_hw, output_hw
    if not (0 <= x0 < x1 <= wi and 0 <= y0 < y1 <= hi):
        raise InputError(f"region box {x0},{y0},{x1},{y1} is empty or outside the model input's {wi}x{hi} "
                         f"pixels (need 0 <= x0 < x1 <= {wi} and 0 <= y0 < y1 <= {hi})")
    m = np.zeros((ho, wo), np.float32)
    m[y0 * ho // hi:-(-y1 * ho // hi), x0 * wo // wi:-(-x1 * wo // wi)] = 1.0
    return m


def parse_region(ex, value, n: int, input_hw: tuple | None, limits: "Limits | None" = None) -> Region | None:
    """A dense model's region from a request option: a box "x0,y0,x1,y1" or [x0, y0, x1, y1] in
    model-input pixels, or a mask (nested lists or an encoded array) of the output's spatial size,
    [H, W] for every sample or [n, H, W]. Form fields and query values carry the same as text
    (a box, or the mask as JSON). None when no region was given (every position)."""
    if value is None or value == "":
        return None
    if not getattr(ex, "accepts_region", False) or not hasattr(ex, "region_shape"):
        raise OptionError("this model's explained output is not dense [batch, classes, H, W]: a region "
                          "applies to segmentation models only")
    want = list(ex.region_shape)
    box = _box_values(value)
    if box is None and isinstance(value, str):      # a mask sent as JSON text (form field, query)
        raw = value.encode()
        if limits is not None:
            json_guard(raw, limits)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, ValueError, RecursionError):
            raise Malformed("region is neither a box x0,y0,x1,y1 nor a JSON mask") from None
        box = _box_values(value)
    if box is not None:
        if len(want) != 2 or not all(isinstance(d, int) for d in want) or input_hw is None:
            raise InputError(f"a region box needs a 2-d output of fixed size and an image input; the "
                             f"output's spatial size is {want}: send the region as a mask")
        mask = box_mask(box, input_hw, tuple(want))[None]
        region = Region(np.broadcast_to(mask, (n, *mask.shape[1:])).copy(), "box", [int(v) for v in box])
    else:
        if not isinstance(value, (list, dict)):
            raise InputError(f"region must be a box x0,y0,x1,y1 or a mask array, got {type(value).__name__}")
        try:
            mask = decode_array(value, "region")
        except InputError as e:
            raise type(e)(str(e) if str(e).startswith("region") else f"region: {e}") from None
        if mask.ndim not in (len(want), len(want) + 1):
            raise InputError(f"region has shape {list(mask.shape)}; the explained output's spatial size is "
                             f"{want} (a mask is [{', '.join(map(str, want))}] or [n, "
                             f"{', '.join(map(str, want))}])")
        mask = ex.check_region(mask.astype(np.float32, copy=False), n)
        region = Region(np.broadcast_to(mask, (n, *mask.shape[1:])).astype(np.float32), "mask")
    return region


def check_samples(ex, x: np.ndarray, max_samples: int) -> np.ndarray:
    """The model's own input checks (shape, NaN/Inf, dtype), then the per-request sample limit."""
    if x.size == 0 and x.ndim <= 1:
        raise InputError("no inputs given")
    x = ex.check_input(x)
    if x.shape[0] == 0:
        raise InputError("no inputs given (batch of 0)")
    if x.shape[0] > max_samples:
        raise InputError(f"{x.shape[0]} samples in one request; at most {max_samples} are accepted")
    return x
