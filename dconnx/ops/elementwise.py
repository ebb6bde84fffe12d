"""Add, Sub, Mul: sums of two data tensors, and affine ops with a constant.

`Add`/`Sub` of two data tensors is a shift and recentering point: its streams
are `(p₁ + p₂, n₁ + n₂)` (Sub: `(p₁ + n₂, n₁ + p₂)`). With a constant
operand the op is an affine map `s·x + t` (no shift, no recentering).
"""
from __future__ import annotations

import numpy as np

from ..compilation import StreamPair
from .registry import TWO_DATA, OpSpec, canonical_rewrite, op_spec
from .base import LinearMap, data_inputs, deflinear, set_streams, split_linear, weight_variant
from .checks import all_of, constant_broadcasts_to_data, one_data_operand, same_shape_data


class AffineMap(LinearMap):
    """y = s ⊙ x + t with constants s (None: 1) and t (None: 0) that broadcast to x's shape."""
    kind = "affine"

    def __init__(self, comp, node, x, y, scale: np.ndarray | None, shift: np.ndarray | None):
        super().__init__(comp, node, x, y)
        rank = comp.view.rank(x)
        self.s = None if scale is None else self._const(scale, rank, "scale")
        self.t = None if shift is None else self._const(shift, rank, "bias")
        self.nonneg = scale is None or bool(np.all(scale >= 0))
        self.scale = scale

    def _const(self, value, rank, what):
        key = (self.node.name, self.node.output[0], what)
        arr = np.asarray(value, dtype=self.b.float_dtype)
        if rank is not None and arr.ndim > rank:
            arr = arr.reshape(arr.shape[arr.ndim - rank:])
        return self.comp.cached(("affine", key), lambda: self.b.const(arr, hint=f"{self.y}::{what}"))

    def weight(self):
        return self.s

    def weight_value(self):
        return self.scale

    def apply(self, x, variant="W"):
        if self.s is None:
            return x if variant != "neg" else self.b.zeros_like(x)
        return self.b.mul(x, weight_variant(self.comp, self.s, variant), hint=f"{self.y}::affine")

    def transpose(self, ct, variant="W"):
        if self.s is None:
            return ct if variant != "neg" else self.b.zeros_like(ct)
        return self.b.mul(ct, weight_variant(self.comp, self.s, variant), hint=f"{self.x}::affineT")

    def bias(self, variant="W"):
        return None if self.t is None else weight_variant(self.comp, self.t, variant)


def affine_of(comp, node) -> AffineMap:
    """The affine map of an Add/Sub/Mul/Div with one constant operand."""
    a, c = node.input[0], node.input[1]
    data_first = comp.view.is_data(a)
    x, k = (a, c) if data_first else (c, a)
    const = comp.view.const(k)
    if const is None:
        raise RuntimeError(f"{node.name}: operand '{k}' is not a constant after canonicalization")
    op = node.op_type
    y = node.output[0]
    if op == "Add":
        return AffineMap(comp, node, x, y, None, const)
    if op == "Sub":
        if data_first:
            return AffineMap(comp, node, x, y, None, -const)
        return AffineMap(comp, node, x, y, -np.ones_like(const), const)
    if op == "Mul":
        return AffineMap(comp, node, x, y, const, None)
    if op == "Div" and data_first:
        return AffineMap(comp, node, x, y, 1.0 / const, None)
    raise RuntimeError(f"{node.name}: {op} with a data divisor is not affine")


def _two_data(comp, node) -> bool:
    return len(data_inputs(comp, node)) == 2


def _split_sum(comp, node):
    b = comp.b
    s1, s2 = comp.stream(node.input[0]), comp.stream(node.input[1])
    y = node.output[0]
    if node.op_type == "Add":
        P, N = b.add(s1.p, s2.p, hint=f"{y}::P"), b.add(s1.n, s2.n, hint=f"{y}::N")
    else:
        P, N = b.add(s1.p, s2.n, hint=f"{y}::P"), b.add(s1.n, s2.p, hint=f"{y}::N")
    set_streams(comp, y, P, N, recenter=True)


def split_add(comp, node):
    if _two_data(comp, node):
        _split_sum(comp, node)
    else:
        split_linear(comp, affine_of(comp, node), recenter=False)


def backward_add(comp, node, rs, cts):
    if _two_data(comp, node):
        ca, cb = rs.sum2(cts[0], node, sign=+1 if node.op_type == "Add" else -1)
        return [(node.input[0], ca), (node.input[1], cb)]
    lin = affine_of(comp, node)
    return [(lin.x, rs.linear(cts[0], lin))]


def _check_div(view, node, data_in, final):
    if view.is_data(node.input[1]):
        return "division by a data-dependent tensor is not supported (no exact DC rule)"
    return None


for _op in ("Add", "Sub"):
    op_spec(OpSpec(_op, "elementwise", split=split_add, backward=backward_add, shift="two-data",
                   recenter="two-data", shape_op=True, const_operands=True,
                   check=all_of(constant_broadcasts_to_data, same_shape_data),
                   doc="two data tensors of one shape: shift and recentering point; "
                       "with a constant operand: affine bias"))

# -- Mul: by a constant (affine), or of two data tensors (polarization) ------------------------
def _mul_map(comp, node):
    """The affine map of a Mul by a constant; None for a product of two data tensors."""
    return None if _two_data(comp, node) else affine_of(comp, node)


def split_mul(comp, node):
    fused = comp.fusions.get(node.name or node.output[0]) if comp.fusions else None
    if fused is not None:
        fused.split(comp, node)
    elif _two_data(comp, node):
        split_product(comp, node)
    else:
        split_linear(comp, affine_of(comp, node), recenter=False)


def backward_mul(comp, node, rs, cts):
    fused = comp.fusions.get(node.name or node.output[0]) if comp.fusions else None
    if fused is not None:
        return fused.backward(comp, node, rs, cts)
    if _two_data(comp, node):
        cx, cy = rs.product(cts[0], node)
        return [(node.input[0], cx), (node.input[1], cy)]
    lin = affine_of(comp, node)
    return [(lin.x, rs.linear(cts[0], lin))]


def split_product(comp, node):
    """x·y with x = P − N, y = Q − R (broadcasting): ½[(P+Q)² + (N+R)²] − ½[(P+R)² + (N+Q)²].
    A square of a nonnegative, convex, nondecreasing function is one too, so both parts are."""
    b = comp.b
    s1, s2 = comp.stream(node.input[0]), comp.stream(node.input[1])
    y = node.output[0]

    def half_sq_sum(u, v, hint):
        return b.half(b.add(b.mul(u, u), b.mul(v, v)), hint=hint)
    PQ, NR = b.add(s1.p, s2.p), b.add(s1.n, s2.n)
    PR, NQ = b.add(s1.p, s2.n), b.add(s1.n, s2.p)
    set_streams(comp, y, half_sq_sum(PQ, NR, f"{y}::P"), half_sq_sum(PR, NQ, f"{y}::N"), recenter=True)


def _check_product(view, node, data_in, final):
    if len(data_in) != 2:
        return None
    s0, s1 = view.shape(node.input[0]), view.shape(node.input[1])
    if s0 is not None and s1 is not None and len(s0) != len(s1):
        return f"a product of data tensors of different ranks ({s0} vs {s1})"
    if final and (s0 is None or s1 is None or any(not isinstance(d, int) for d in s0[1:] + s1[1:])):
        return f"a product of data tensors whose shapes are not static ({s0} vs {s1})"
    return None


op_spec(OpSpec("Mul", "elementwise", split=split_mul, backward=backward_mul, linear_map=_mul_map,
               shift=TWO_DATA, recenter=TWO_DATA, shape_op=True, const_operands=True,
               check=all_of(constant_broadcasts_to_data, _check_product),
               doc="by a constant (either sign; per-channel constants too): affine; of two data tensors "
                   "(gates, with broadcasting): polarization, a shift and recentering point"))
canonical_rewrite("Div", "elementwise", "Mul by the reciprocal constant", "div_to_mul", shape_op=True,
                  const_operands=True, check=all_of(_check_div, one_data_operand, constant_broadcasts_to_data))


def constant_streams(comp, name: str) -> StreamPair:
    """Streams of a constant operand: (relu(c), relu(-c))."""
    def make():
        b = comp.b
        return StreamPair(b.relu(name, hint=f"{name}::p"), b.relu(b.neg(name), hint=f"{name}::n"))
    return comp.cached(("conststreams", name), make)
