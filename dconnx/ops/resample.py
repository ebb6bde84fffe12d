"""Resize / Upsample and ConvTranspose: fixed linear maps that change the spatial size.

Resize with constant scales or sizes is separable: along each resized axis the
output is `A · x` with a constant interpolation matrix `A` (rows of 0/1 for
nearest, two weights summing to 1 for linear). The matrices are computed here
exactly as the ONNX operator defines them (coordinate transformation, nearest
rounding mode, clamping at the border) and applied with MatMul on the last two
axes; the backward is the same product with `Aᵀ` (no runtime gradient of Resize
is needed). The map is nonnegative, so each stream goes through it alone.

ConvTranspose has a signed constant weight: the linear rule with |W| like Conv;
its adjoint is a Conv with the same weight, strides, dilations, pads and groups.
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from ..ir import node_label
from .registry import canonical_rewrite
from .base import LinearMap, deflinear, weight_variant
from .linear import ConvFamilyMap
from .checks import all_of, constant_parameters, one_data_operand

# inputs whose float type ONNX fixes whatever the data's type (roi, scales): a model cast to
# another float type keeps them float32
FIXED_FLOAT32_OPERANDS = {"Resize": (1, 2)}

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_half_pixel_for_nn", "half_pixel_symmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def resize_coordinates(out_len: int, in_len: int, scale: float, mode: str, dtype=np.float32) -> np.ndarray:
    """The input coordinate of every output position along one axis (ONNX Resize), computed
    in `dtype` in the operator's order of operations."""
    t = np.dtype(dtype).type
    x = np.arange(out_len, dtype=dtype)
    s = t(scale)
    half = t(0.5)
    if mode == "half_pixel":
        return (x + half) / s - half
    if mode == "pytorch_half_pixel":
        return (x + half) / s - half if out_len > 1 else np.zeros(out_len, dtype)
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros(out_len, dtype)
        return x * t(in_len - 1) / t(out_len - 1)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / s
    if mode == "half_pixel_symmetric":
        adj = t(out_len) / (s * t(in_len))
        center = t(in_len) / t(2)
        offset = center * (t(1) - adj)
        return offset + (x + half) / s - half
    raise ValueError(f"coordinate_transformation_mode {mode!r}")


def resize_matrix(out_len: int, in_len: int, scale: float, mode: str, coord: str,
                  nearest_mode: str = "round_prefer_floor", dtype=np.float32) -> np.ndarray:
    """A [out_len, in_len] with (A x)[i] the Resize output at i along one axis."""
    c = resize_coordinates(out_len, in_len, scale, coord, dtype).astype(np.float64)
    A = np.zeros((out_len, in_len), np.float64)
    rows = np.arange(out_len)
    if mode == "nearest":
        fl = np.floor(c)
        if nearest_mode == "floor":
            idx = fl
        elif nearest_mode == "ceil":
            idx = np.ceil(c)
        elif nearest_mode == "round_prefer_floor":
            idx = np.where(c - fl == 0.5, fl, np.floor(c + 0.5))
        elif nearest_mode == "round_prefer_ceil":
            idx = np.where(c - fl == 0.5, fl + 1, np.floor(c + 0.5))
        else:
            raise ValueError(f"nearest_mode {nearest_mode!r}")
        idx = np.clip(idx, 0, in_len - 1).astype(np.int64)
        A[rows, idx] = 1.0
        return A
    if mode == "linear":
        c = np.clip(c, 0, in_len - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, in_len - 1)
        w = c - i0
        np.add.at(A, (rows, i0), 1.0 - w)
        np.add.at(A, (rows, i1), w)
        return A
    raise ValueError(f"mode {mode!r}")


def resize_reason(view, node, data_in=(), final: bool = True) -> str | None:
    """Why a Resize/Upsample node cannot be converted, or None (attribute and operand checks)."""
    from ..ir import attrs
    a = attrs(node)
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        return f"mode '{mode}' is not supported (nearest and linear are)"
    if node.op_type == "Upsample":
        return None
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    if coord not in COORDINATE_MODES:
        return f"coordinate_transformation_mode '{coord}' is not supported"
    if a.get("nearest_mode", "round_prefer_floor") not in NEAREST_MODES:
        return f"nearest_mode '{a.get('nearest_mode')}' is not supported"
    if int(a.get("antialias", 0)) and mode != "nearest":
        return "antialias=1 is not supported"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy other than 'stretch' is not supported"
    for i in node.input[1:]:
        if i and view.is_data(i):
            return f"operand '{i}' depends on the data (scales and sizes must be constant)"
    if not final:
        return None
    try:
        _resize_geometry(view, node)
    except ValueError as e:
        return str(e)
    return None


def _resize_geometry(view, node):
    """[(axis, out_len, in_len, scale)] for the resized axes (scale 1 elsewhere)."""
    from ..ir import attrs
    a = attrs(node)
    x, y = node.input[0], node.output[0]
    xs, ys = view.shape(x), view.shape(y)
    if xs is None or ys is None:
        raise ValueError("the input or output shape is unknown")
    rank = len(xs)
    axes = [int(v) % rank for v in a.get("axes", range(rank))]
    scales = view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = view.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and np.asarray(scales).size == 0:
        scales = None
    if scales is None and sizes is None:
        if not (len(node.input) > 3 and node.input[3]):
            raise ValueError("the scales or sizes are not constant")
        # sizes computed from the input's shape (batch axis dynamic): the inferred output
        # size is the size asked for on every other axis
        sizes = [d if isinstance(d, int) else 1 for d in ys]
        axes = list(range(rank))
    out = []
    for j, ax in enumerate(axes):
        lin, lout = xs[ax], ys[ax]
        if ax == 0:
            if sizes is None and float(scales[j]) != 1.0:
                raise ValueError("resizes the batch axis")
            continue
        if sizes is not None:
            scale = float(int(sizes[j])) / float(lin) if isinstance(lin, int) else 1.0
        else:
            scale = float(scales[j])
        if not isinstance(lin, int) or not isinstance(lout, int):
            raise ValueError(f"resized axis {ax} has no static size")
        if lin == lout and scale == 1.0:
            continue
        if ax < rank - 2:
            raise ValueError(f"resizes axis {ax} (only the last two axes may be resized)")
        out.append((ax, lout, lin, scale))
    return out


class ResizeMap(LinearMap):
    """Separable constant interpolation: y = A_H · x · A_Wᵀ on the last two axes."""
    nonneg = True

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        a = self.attrs
        mode = a.get("mode", "nearest")
        mode = "linear" if mode == "bilinear" else mode
        self.mode = mode
        self.kind = "move" if mode == "nearest" else "pool"
        coord = a.get("coordinate_transformation_mode", "half_pixel")
        nearest = a.get("nearest_mode", "round_prefer_floor")
        try:
            geo = _resize_geometry(comp.view, node)
        except ValueError as e:
            raise UnsupportedOpError([(node_label(node), node.op_type, str(e))]) from None
        self.rank = comp.view.rank(self.x)
        self.mats = {}
        for ax, lout, lin, scale in geo:
            A = resize_matrix(lout, lin, scale, mode, coord, nearest, dtype=self.b.float_dtype)
            self.mats[ax] = A.astype(self.b.float_dtype)

    def _mat(self, ax: int, transposed: bool, left: bool) -> str:
        """The constant for axis `ax`: left operand A (or Aᵀ) on axis rank-2, right operand
        Aᵀ (or A) on the last axis."""
        key = ("resize_mat", self.y, ax, transposed)

        def make():
            A = self.mats[ax]
            M = A.T if transposed else A
            if not left:
                M = M.T
            return self.b.const(np.ascontiguousarray(M), hint=f"{self.y}::resize{ax}{'T' if transposed else ''}")
        return self.comp.cached(key, make)

    def _product(self, x: str, transposed: bool, hint: str) -> str:
        b = self.b
        for ax in sorted(self.mats):
            if ax == self.rank - 2:
                x = b.op("MatMul", [self._mat(ax, transposed, True), x], hint=hint)
            else:
                x = b.op("MatMul", [x, self._mat(ax, transposed, False)], hint=hint)
        return x

    def apply(self, x, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(self.y)
        if not self.mats:
            return x
        return self._product(x, False, f"{self.y}::resize")

    def transpose(self, ct, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(ct)
        if not self.mats:
            return ct
        return self._product(ct, True, f"{self.x}::resizeT")


deflinear("Resize", "resample", ResizeMap, shift=False, recenter=False, keeps_sign=True, zero_n=True,
          check=resize_reason,
          doc="constant scales or sizes; nearest (every nearest_mode) and linear, coordinate modes "
              "half_pixel / pytorch_half_pixel / align_corners / asymmetric (and tf_half_pixel_for_nn, "
              "half_pixel_symmetric); separable constant matrices, transposed for the backward")
def keep_legacy_resize_coordinates(before, after, old_opset: int) -> None:
    """Upsample and Resize before opset 11 sample at x_out / scale ("asymmetric"; nearest rounds
    down when upsampling); onnx's version converter makes them Resize-11+ nodes with the default
    half_pixel coordinates. Give those nodes (the converted graph's Resize nodes, in order) their
    coordinates back."""
    from onnx import helper
    from ..ir import attrs
    if old_opset >= 11:
        return
    modes = [attrs(n).get("mode", "nearest") for n in before.graph.node if n.op_type in ("Upsample", "Resize")]
    resized = [n for n in after.graph.node if n.op_type == "Resize"]
    for n, mode in zip(resized, modes):
        keep = [a for a in n.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del n.attribute[:]
        n.attribute.extend(keep)
        n.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if mode == "nearest":
            n.attribute.append(helper.make_attribute("nearest_mode", "floor"))


canonical_rewrite("Upsample", "resample", "Resize with asymmetric coordinates (nearest: floor), by the "
                  "opset upgrade", "upgrade_opset", check=resize_reason)


# -- ConvTranspose ------------------------------------------------------------
class ConvTransposeMap(ConvFamilyMap):
    forward_op = "ConvTranspose"

    def __init__(self, comp, node):
        super().__init__(comp, node)
        view = comp.view
        wshape = view.shape(self.w)
        a = self.attrs
        self.k = list(a.get("kernel_shape", wshape[2:]))
        nd = len(self.k)
        self.nd = nd
        self.strides = list(a.get("strides", [1] * nd))
        self.dil = list(a.get("dilations", [1] * nd))
        self.group = int(a.get("group", 1))
        self.out_pad = list(a.get("output_padding", [0] * nd))
        self.in_sp = list(view.shape(self.x)[2:])
        self.out_sp = list(view.shape(self.y)[2:])
        pads = list(a.get("pads", [0] * (2 * nd)))
        auto = a.get("auto_pad", "NOTSET")
        if "output_shape" in a or auto not in ("NOTSET", ""):
            # pads from the output size the model has (ONNX ConvTranspose's formula)
            for i in range(nd):
                total = self.strides[i] * (self.in_sp[i] - 1) + self.out_pad[i] + \
                    (self.k[i] - 1) * self.dil[i] + 1 - self.out_sp[i]
                small, big = total // 2, total - total // 2
                pads[i], pads[nd + i] = (small, big) if auto == "SAME_UPPER" else (big, small)
            self.out_pad = [0] * nd
            for i in range(nd):   # what the pads leave: output padding at the end
                full = (self.in_sp[i] - 1) * self.strides[i] - pads[i] - pads[nd + i] + \
                    (self.k[i] - 1) * self.dil[i] + 1
                self.out_pad[i] = self.out_sp[i] - full
        self.pads = pads
        if any(p < 0 for p in self.pads) or any(p < 0 for p in self.out_pad):
            raise UnsupportedOpError([(node_label(node), "ConvTranspose",
                                       f"negative pads {self.pads} / output padding {self.out_pad}")])

    def _forward_attrs(self) -> dict:
        return dict(super()._forward_attrs(),
                    output_padding=self.out_pad if any(self.out_pad) else None)

    def _adjoint(self, ct, variant):
        b = self.b
        out = b.op("Conv", [ct, weight_variant(self.comp, self.w, variant)], kernel_shape=self.k,
                   strides=self.strides, dilations=self.dil, pads=self.pads, group=self.group,
                   hint=f"{self.x}::convtT.{variant}")
        # an output padding of a stride or more leaves positions no input reaches: crop them
        reach = [self.dil[i] * (self.k[i] - 1) + 1 for i in range(self.nd)]
        conv_len = [(self.out_sp[i] + self.pads[i] + self.pads[self.nd + i] - reach[i]) // self.strides[i] + 1
                    for i in range(self.nd)]
        if conv_len != self.in_sp:
            out = b.slice(out, [0] * self.nd, self.in_sp, list(range(2, 2 + self.nd)),
                          hint=f"{self.x}::convtT.crop")
        return out


def _check_convt(view, node, data_in, final):
    if view.is_data(node.input[1]):
        return "the weight depends on the data"
    return None


deflinear("ConvTranspose", "resample", ConvTransposeMap, shift=True, recenter=True, weights=True,
          const_operands=True, check=all_of(one_data_operand, constant_parameters, _check_convt),
          doc="any stride/padding/output_padding/dilation/groups, output_shape and auto_pad made "
              "explicit; constant weight and bias; the adjoint is a Conv with the same weight")
