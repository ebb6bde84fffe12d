"""Max/Min of several tensors, Abs, Neg, Sum/Mean, GlobalMaxPool, ReduceMax/ReduceMin.

Each is piecewise linear and becomes, in canonicalization, ops that already
have exact DC rules:

    max(a, b) = b + relu(a − b)          min(a, b) = a − relu(a − b)
    |x| = relu(x) + relu(−x)             −x = (−1)·x (an affine map: the streams swap)
    Sum = a chain of Add                 Mean = that chain · 1/n
    GlobalMaxPool = MaxPool over the whole map
    ReduceMax over spatial axes = MaxPool whose window is those axes (a Reshape drops them
    when keepdims = 0);  ReduceMin(x) = −ReduceMax(−x)

so the split, every backward rule set, the α-shift (at the Relu, the Add of two data
tensors and the MaxPool) and the "wta"/"dc" MaxPool modes come with them.
"""
from __future__ import annotations

import numpy as np

from ..ir import attrs
from .registry import canonical_rewrite
from .rewrite import NodeWriter

REWRITE = "selection_to_relu"


def _spatial_axes(view, node) -> list[int] | None:
    axes = view.reduce_axes(node)
    if axes is None:
        return None
    return sorted(axes)


def _check_reduce_max(view, node, data_in, final):
    rank = view.rank(node.input[0])
    axes = view.reduce_axes(node)
    if axes is None:
        return "the reduced axes are not constant" if final else None
    if not axes or 0 in axes:
        return "reduces over the batch axis"
    if rank is None or rank < 3 or 1 in axes:
        return "only a max over spatial axes (not channels) is supported"
    if final:
        xs = view.shape(node.input[0])
        if xs is None or any(not isinstance(xs[i], int) for i in axes):
            return "the reduced axes have no static size"
    return None


def _check_operands(view, node, data_in, final):
    if not node.input or not any(node.input):
        return "no operand"
    return None


def _check_global(view, node, data_in, final):
    xs = view.shape(node.input[0])
    if final and (xs is None or len(xs) < 3 or any(not isinstance(d, int) for d in xs[2:])):
        return "the spatial size is not static"
    return None


def rewrite_node(view, node, fresh, add_init) -> list | None:
    """The exact replacement of one node (nodes writing its output), or None to keep it."""
    op = node.op_type
    y = node.output[0]
    w = NodeWriter(view, node, fresh, add_init)
    mk, scaled = w.op, w.scaled
    if op == "Neg":
        scaled(node.input[0], -1.0, y)
    elif op == "Abs":
        x = node.input[0]
        mk("Add", [mk("Relu", [x]), mk("Relu", [scaled(x, -1.0)])], y)
    elif op in ("Max", "Min", "Sum", "Mean"):
        ins = [i for i in node.input if i]
        if not any(view.is_data(i) for i in ins):
            return None
        acc = ins[0]
        for j, c in enumerate(ins[1:]):
            last = j == len(ins) - 2 and op != "Mean"
            out = y if last else None
            if op == "Max":
                acc = mk("Add", [mk("Relu", [mk("Sub", [acc, c])]), c], out)
            elif op == "Min":
                acc = mk("Sub", [acc, mk("Relu", [mk("Sub", [acc, c])])], out)
            else:
                acc = mk("Add", [acc, c], out)
        if op == "Mean" or len(ins) == 1:
            scaled(acc, 1.0 / len(ins) if op == "Mean" else 1.0, y)
    elif op == "GlobalMaxPool":
        xs = view.shape(node.input[0])
        mk("MaxPool", [node.input[0]], y, kernel_shape=list(xs[2:]))
    elif op in ("ReduceMax", "ReduceMin"):
        x = node.input[0]
        xs = view.shape(x)
        axes = _spatial_axes(view, node)
        keep = int(attrs(node).get("keepdims", 1))
        if op == "ReduceMin":
            x = scaled(x, -1.0)
        kernel = [xs[i] if i in axes else 1 for i in range(2, len(xs))]
        last = keep and op == "ReduceMax"
        m = mk("MaxPool", [x], y if last else None, kernel_shape=kernel)
        if not keep:
            shape = [-1] + [xs[i] for i in range(1, len(xs)) if i not in axes]
            m = mk("Reshape", [m, w.const(shape, "shape", np.int64)],
                   y if op == "ReduceMax" else None)
        if op == "ReduceMin":
            scaled(m, -1.0, y)
    else:
        return None
    return w.nodes


_BECOMES = {
    "Max": "Relu(x) for Max(x, 0); b + Relu(a - b) pairwise otherwise (exact)",
    "Min": "a - Relu(a - b) pairwise (exact)",
    "Abs": "Relu(x) + Relu(-x) (exact)",
    "Neg": "Mul by -1 (the streams swap)",
    "Sum": "a chain of Add",
    "Mean": "a chain of Add, then Mul by 1/n",
    "GlobalMaxPool": "MaxPool over the whole map",
    "ReduceMax": "MaxPool over the reduced spatial axes (+ Reshape when keepdims=0)",
    "ReduceMin": "-ReduceMax(-x): Mul by -1, MaxPool, Mul by -1",
}
_CHECKS = {"ReduceMax": _check_reduce_max, "ReduceMin": _check_reduce_max, "GlobalMaxPool": _check_global}
_SHAPE_OPS = {"Max", "Min", "Abs", "Neg"}      # also seen in integer shape arithmetic

for _op, _what in _BECOMES.items():
    canonical_rewrite(_op, "selection", _what, REWRITE, shape_op=_op in _SHAPE_OPS,
                      check=_CHECKS.get(_op, _check_operands))
