"""MaxPool, AveragePool, GlobalAveragePool.

Window sums and their transposes run as a one-channel Conv / ConvTranspose on
the tensor reshaped to [batch·channels, 1, H, W], so they work for any channel
count, dilation and for stacked cotangents. MaxPool routing uses
onnxruntime's `Indices` output (a flat index over the whole tensor, reduced
here to the index within each channel plane) and a ScatterElements with
reduction "add", so overlapping windows accumulate.
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from ..ir import attrs, node_label
from .registry import OpSpec, op_spec
from .base import LinearMap, deflinear, set_streams
from .checks import reduce_axes_not_batch


class Window:
    """Geometry of a pooling window over the spatial dims of a static-shaped tensor."""

    def __init__(self, comp, node):
        a = attrs(node)
        self.comp, self.node = comp, node
        self.x, self.y = node.input[0], node.output[0]
        xs, ys = comp.view.shape(self.x), comp.view.shape(self.y)
        self.channels = xs[1]
        self.in_sp, self.out_sp = list(xs[2:]), list(ys[2:])
        nd = len(self.in_sp)
        self.nd = nd
        self.k = list(a["kernel_shape"])
        self.s = list(a.get("strides", [1] * nd))
        self.d = list(a.get("dilations", [1] * nd))
        pads = list(a.get("pads", [0] * (2 * nd)))
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
            raise UnsupportedOpError([(node_label(node), node.op_type, "auto_pad must be made explicit")])
        # ceil_mode: pad the end so that floor arithmetic gives the same windows
        for i in range(nd):
            reach = self.d[i] * (self.k[i] - 1) + 1
            need = (self.out_sp[i] - 1) * self.s[i] + reach - (self.in_sp[i] + pads[i] + pads[nd + i])
            if need > 0:
                pads[nd + i] += need
        self.pads = pads
        self.plane = int(np.prod(self.in_sp))
        self.size = int(np.prod(self.k))

    def _planes(self, x, spatial):
        return self.comp.b.reshape(x, [-1, 1] + spatial, hint=f"{x}::planes")

    def _ones(self):
        return self.comp.cached(("ones_kernel", tuple(self.k)), lambda: self.comp.b.const(
            np.ones([1, 1] + self.k, dtype=self.comp.b.float_dtype), hint="ones_kernel"))

    def window_sum(self, x):
        """Σ over each window (zero padding adds nothing), shaped like the pool output."""
        b = self.comp.b
        out = b.op("Conv", [self._planes(x, self.in_sp), self._ones()], kernel_shape=self.k,
                   strides=self.s, dilations=self.d, pads=self.pads, hint=f"{self.y}::wsum")
        return b.reshape(out, [-1, self.channels] + self.out_sp)

    def window_sum_T(self, ct):
        """Adjoint of window_sum: every output value added back over its window."""
        b = self.comp.b
        full = [(self.out_sp[i] - 1) * self.s[i] - self.pads[i] - self.pads[self.nd + i]
                + self.d[i] * (self.k[i] - 1) + 1 for i in range(self.nd)]
        out_pad = [self.in_sp[i] - full[i] for i in range(self.nd)]
        pads = list(self.pads)
        for i in range(self.nd):   # windows that end past the input: crop instead of padding
            if out_pad[i] < 0:
                pads[self.nd + i] -= out_pad[i]
                out_pad[i] = 0
        out = b.op("ConvTranspose", [self._planes(ct, self.out_sp), self._ones()],
                   kernel_shape=self.k, strides=self.s, dilations=self.d, pads=pads,
                   output_padding=out_pad if any(out_pad) else None, hint=f"{self.x}::wsumT")
        return b.reshape(out, [-1, self.channels] + self.in_sp)

    # -- argmax routing (MaxPool) -----------------------------------------
    def plane_indices(self):
        """Index of each window's argmax within its channel plane, int64 [B, C, h·w]."""
        def make():
            b = self.comp.b
            idx = self.comp.maxpool_indices(self.node)
            flat = b.reshape(idx, [0, 0, -1], hint=f"{self.y}::idx")
            return b.op("Mod", [flat, b.const(np.asarray(self.plane, dtype=np.int64))],
                        hint=f"{self.y}::pidx")
        return self.comp.cached(("pidx", self.y), make)

    def gather(self, x):
        b = self.comp.b
        flat = b.reshape(x, [0, 0, -1])
        g = b.op("GatherElements", [flat, self.plane_indices()], axis=2, hint=f"{self.y}::gather")
        return b.reshape(g, [0, 0] + self.out_sp)

    def route(self, ct, k: int = 1):
        """Adjoint of gather for a cotangent stacked k times along the batch axis."""
        b = self.comp.b
        idx = self.comp.tiled(self.plane_indices(), k)
        upd = b.reshape(ct, [0, 0, -1], hint=f"{self.x}::upd")
        lead = b.shape_of(upd, 0, 2)
        zshape = b.concat([lead, b.ints([self.plane])], axis=0)
        zeros = b.op("ConstantOfShape", [zshape], value=_zero_tensor(b.float_dtype))
        out = b.op("ScatterElements", [zeros, idx, upd], axis=2, reduction="add",
                   hint=f"{self.x}::route")
        return b.reshape(out, [0, 0] + self.in_sp)


def _zero_tensor(dtype):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.zeros([1], dtype=dtype))


# -- MaxPool ---------------------------------------------------------------
def split_maxpool(comp, node):
    w = Window(comp, node)
    sp = comp.stream(w.x)
    b = comp.b
    if comp.opts.maxpool == "wta":
        P, N = w.gather(sp.p), w.gather(sp.n)
    else:
        N = w.window_sum(sp.n)
        if comp.opts.share_forward:
            top = w.y
        else:
            a = attrs(node)
            top = b.op("MaxPool", [b.sub(sp.p, sp.n)], kernel_shape=w.k, strides=w.s,
                       dilations=w.d, pads=a.get("pads"), ceil_mode=a.get("ceil_mode"))
        P = b.add(top, N, hint=f"{w.y}::P")
    set_streams(comp, w.y, P, N, recenter=False)


def backward_maxpool(comp, node, rs, cts):
    return [(node.input[0], rs.maxpool(cts[0], Window(comp, node)))]


def _check_maxpool(view, node, data_in, final):
    idx = node.output[1] if len(node.output) > 1 else ""
    if idx and view.consumers.get(idx):
        users = ", ".join(sorted({f"{n.op_type} '{n.name or n.output[0]}'" for n in view.consumers[idx]}))
        return (f"its Indices output '{idx}' (integer argmax positions) feeds the graph ({users}): "
                "a computation on argmax positions is not differentiable and is not supported")
    if int(attrs(node).get("storage_order", 0)) and idx and idx in set(view.output_names):
        return ("storage_order=1 (column-major Indices) with its Indices output used by the graph "
                "is not supported")
    return None


op_spec(OpSpec("MaxPool", "pooling", split=split_maxpool, backward=backward_maxpool, shift=True,
               recenter=False, keeps_sign=True, zero_n=True, auto_pad=True, window_pool=True,
               check=_check_maxpool,
               doc='"wta": both streams gathered at the argmax of p − n (default); '
                   '"dc": exact DC form max_i(p_i + Σ_{j≠i} n_j) − Σ_j n_j; backward scatter-adds'))


# -- average pooling -------------------------------------------------------
class AveragePoolMap(LinearMap):
    kind = "pool"
    nonneg = True

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.win = Window(comp, node)
        # ceil_mode windows that run past the padded input: their divisor is their own count
        self.partial = bool(int(self.attrs.get("ceil_mode", 0))) and partial_windows(comp.view, node)

    def _inv_count(self):
        """1 / (number of summed positions) per output position, [1, 1, *out]."""
        def make():
            w = self.win
            include = int(self.attrs.get("count_include_pad", 0))
            pads = list(self.attrs.get("pads", [0] * (2 * w.nd)))
            count = window_counts(w.in_sp, w.out_sp, w.k, w.s, w.d, pads, include)
            inv = (1.0 / count).reshape([1, 1] + w.out_sp).astype(self.b.float_dtype)
            return self.b.const(inv, hint=f"{self.y}::invcount")
        return self.comp.cached(("invcount", self.y), make)

    def apply(self, x, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(self.y)
        if self.partial:       # the window sums times the per-window divisor, as the transpose
            return self.b.mul(self.win.window_sum(x), self._inv_count(), hint=f"{self.y}::avgpool")
        return self.b.op("AveragePool", [x], kernel_shape=self.win.k, strides=self.win.s,
                         pads=self.attrs.get("pads"), ceil_mode=self.attrs.get("ceil_mode"),
                         count_include_pad=self.attrs.get("count_include_pad"),
                         dilations=self.attrs.get("dilations"), hint=f"{self.y}::avgpool")

    def transpose(self, ct, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(ct)
        return self.win.window_sum_T(self.b.mul(ct, self._inv_count()))


class GlobalAveragePoolMap(LinearMap):
    kind = "pool"
    nonneg = True

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        shape = comp.view.shape(self.x)
        self.spatial = list(shape[2:])
        self.count = int(np.prod(self.spatial))

    def apply(self, x, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(self.y)
        return self.b.op("GlobalAveragePool", [x], hint=f"{self.y}::gap")

    def transpose(self, ct, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(ct)
        b = self.b
        scaled = b.mul(ct, b.scalar(1.0 / self.count))
        shape = b.concat([b.shape_of(ct, 0, 2), b.ints(self.spatial)], axis=0)
        return b.op("Expand", [scaled, shape], hint=f"{self.x}::gapT")


class ReduceSumMap(LinearMap):
    """A sum (ReduceMean: a mean) over non-batch axes; the adjoint broadcasts back (Expand)."""
    kind = "pool"
    nonneg = True

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.axes = comp.view.reduce_axes(node)
        self.keep = int(self.attrs.get("keepdims", 1))
        self.in_shape = comp.view.shape(self.x)
        self.count = int(np.prod([self.in_shape[i] for i in self.axes]))

    def apply(self, x, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(self.y)
        return self.b.reduce(self.node.op_type, x, self.axes, keepdims=self.keep, hint=f"{self.y}::reduce")

    def transpose(self, ct, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(ct)
        b = self.b
        if not self.keep:
            ct = b.unsqueeze(ct, self.axes)
        if self.node.op_type == "ReduceMean":
            ct = b.mul(ct, b.scalar(1.0 / self.count))
        shape = b.concat([b.shape_of(ct, 0, 1), b.ints(self.in_shape[1:])], axis=0)
        return b.op("Expand", [ct, shape], hint=f"{self.x}::reduceT")


def window_counts(in_sp, out_sp, k, s, d, pads, include_pad: int) -> np.ndarray:
    """How many positions each average-pooling window divides by: the window's positions inside
    the input (count_include_pad=0) or inside the input and its explicit pads (1); positions a
    ceil_mode window reaches past the padded end never count (onnxruntime and torch agree)."""
    nd = len(in_sp)
    per_axis = []
    for i in range(nd):
        lo, hi = (-pads[i], in_sp[i] + pads[nd + i]) if include_pad else (0, in_sp[i])
        start = np.arange(out_sp[i]) * s[i] - pads[i]
        pos = start[:, None] + np.arange(k[i])[None, :] * d[i]
        per_axis.append(((pos >= lo) & (pos < hi)).sum(1).astype(np.float64))
    count = per_axis[0]
    for c in per_axis[1:]:
        count = np.multiply.outer(count, c)
    return count


def partial_windows(view, node) -> bool:
    """Whether a pool's output is longer than floor arithmetic gives (ceil_mode windows that
    start inside the input but end past its padded end)."""
    a = attrs(node)
    xs, ys = view.shape(node.input[0]), view.shape(node.output[0])
    k = list(a["kernel_shape"])
    nd = len(k)
    s, d = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    for i in range(nd):
        floor = (xs[2 + i] + pads[i] + pads[nd + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1
        if ys[2 + i] != floor:
            return True
    return False


deflinear("ReduceSum", "pooling", ReduceSumMap, shift=False, recenter=False, zero_n=True,
          check=reduce_axes_not_batch, doc="over non-batch axes")
deflinear("ReduceMean", "pooling", ReduceSumMap, shift=False, recenter=False, zero_n=True,
          check=reduce_axes_not_batch,
          doc="over non-batch axes (over all spatial axes it becomes GlobalAveragePool)")
deflinear("AveragePool", "pooling", AveragePoolMap, shift=False, recenter=False, keeps_sign=True,
          zero_n=True, auto_pad=True, window_pool=True,
          doc="nonnegative linear map on each stream (count_include_pad either way; ceil_mode partial "
              "windows divide by their own count)")
deflinear("GlobalAveragePool", "pooling", GlobalAveragePoolMap, shift=False, recenter=False,
          keeps_sign=True, zero_n=True,
          doc="nonnegative linear map on each stream (spatial ReduceMean is rewritten to it)")
