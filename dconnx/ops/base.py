"""Pieces shared by the op families: linear maps, weight variants, stream bookkeeping.

Most canonical ops are linear in their one data input at fixed masks. Such an
op is described by a `LinearMap` that knows how to apply itself (forward) and
its transpose (backward) with a chosen weight variant:

    "W"    the weight itself          "abs"  |W|
    "pos"  W⁺ = max(W, 0)             "neg"  W⁻ = max(−W, 0)
    "gamma=<g>"  W + g·W⁺  (LRP-γ)

`deflinear` declares such an op's OpSpec, its split and backward rules built
from one map factory, as JAX's `deflinear` does for linear primitives.
"""
from __future__ import annotations

from typing import Callable

import onnx

from ..compilation import Compilation, StreamPair
from ..ir import attrs
from .registry import OpSpec, op_spec

NONNEG_VARIANTS = ("W", "abs", "pos")


def weight_variant(comp: Compilation, w: str, variant: str) -> str:
    """A variant of a constant tensor, computed in the graph from the original
    initializer (onnxruntime folds it once at session start; the file keeps one copy)."""
    if variant == "W":
        return w
    b = comp.b

    def make():
        if variant == "abs":
            return b.abs(w, hint=f"{w}::abs")
        if variant == "pos":
            return b.relu(w, hint=f"{w}::pos")
        if variant == "neg":
            return b.relu(b.neg(w), hint=f"{w}::neg")
        if variant.startswith("gamma="):
            g = float(variant.split("=", 1)[1])
            return b.add(w, b.mul(b.relu(w), b.scalar(g)), hint=f"{w}::gamma")
        raise ValueError(f"unknown weight variant {variant!r}")
    return comp.cached(("weight", w, variant), make)


class LinearMap:
    """y = M x + c for the data input x of one node (c: optional constant bias).

    kind: "weight" (Conv/Gemm/MatMul/BN), "affine" (constant Mul/Add),
    "pool" (average pooling) or "move" (reshapes, slices, pads: relevance is
    moved, not redistributed). `nonneg` maps have M ≥ 0, so every nonnegative
    variant is M itself and "neg" is zero.
    """
    kind = "weight"
    nonneg = False

    def __init__(self, comp: Compilation, node: onnx.NodeProto, x: str, y: str):
        self.comp, self.node, self.x, self.y = comp, node, x, y
        self.b = comp.b
        self.attrs = attrs(node)

    # forward product without the bias
    def apply(self, x: str, variant: str = "W") -> str:
        raise NotImplementedError

    # adjoint product (input-shaped), batch-agnostic
    def transpose(self, ct: str, variant: str = "W") -> str:
        raise NotImplementedError

    # the bias variant, broadcastable to y, or None
    def bias(self, variant: str = "W") -> str | None:
        return None

    def apply_biased(self, x: str, variant: str = "W") -> str:
        """apply(x) + bias, in one op where the op takes a bias (Conv, Gemm): the runtime then
        keeps the result in its blocked layout and can fuse the sum that follows."""
        return _plus(self.b, self.apply(x, variant), self.bias(variant), f"{self.y}::{variant}b")

    def weight(self) -> str | None:
        """The weight tensor (for per-layer α), if any."""
        return None

    def weight_value(self):
        """The weight as a numpy array (for per-layer α), or None."""
        w = self.weight()
        return None if w is None else self.comp.view.const(w)

    def _nonneg_variant(self, variant: str) -> str | None:
        """For nonneg maps: the variant to use, or None when it is zero."""
        if variant == "neg":
            return None
        return "W"


def set_streams(comp: Compilation, y: str, P: str, N: str, recenter: bool,
                nonneg: bool = False) -> None:
    """Record an op's output streams and apply recentering where the op is a recentering point.
    `nonneg`: the original activation y is ≥ 0 (a Relu's output), so relu(y) is y itself."""
    comp.pre_streams[y] = StreamPair(P, N)
    if recenter and comp.opts.stabilize == "recenter":
        b = comp.b
        if comp.opts.share_forward:
            d = y          # p − n is the original activation
        else:
            d = b.sub(P, N, hint=f"{y}::d")
        p = y if nonneg and comp.opts.share_forward else b.relu(d, hint=f"{y}::p")
        comp.streams[y] = StreamPair(p, b.relu(b.neg(d), hint=f"{y}::n"))
    else:
        comp.streams[y] = StreamPair(P, N)


def _plus(b, a: str | None, c: str | None, hint: str) -> str | None:
    if a is None:
        return c
    if c is None:
        return a
    return b.add(a, c, hint=hint)


def split_linear(comp: Compilation, lin: LinearMap, recenter: bool) -> None:
    """Streams of y = W x + c from the streams of x (the linear rule of docs/method.md §2)."""
    b = comp.b
    sp = comp.stream(lin.x)
    y = lin.y
    if lin.nonneg:
        P = lin.apply(sp.p)
        N = lin.apply(sp.n)
        P = _plus(b, P, lin.bias("pos"), f"{y}::P")
        N = _plus(b, N, lin.bias("neg"), f"{y}::N")
    elif comp.opts.linear_form == "four":
        P = b.add(lin.apply(sp.p, "pos"), lin.apply(sp.n, "neg"), hint=f"{y}::P")
        N = b.add(lin.apply(sp.p, "neg"), lin.apply(sp.n, "pos"), hint=f"{y}::N")
        P = _plus(b, P, lin.bias("pos"), f"{y}::P")
        N = _plus(b, N, lin.bias("neg"), f"{y}::N")
    else:
        S = lin.apply_biased(comp.stream_sum(lin.x), "abs")
        if comp.opts.share_forward:
            D = y
        else:
            D = lin.apply(b.sub(sp.p, sp.n, hint=f"{lin.x}::d"), "W")
            D = _plus(b, D, lin.bias("W"), f"{y}::D")
        # (S ± D)/2 can round to a tiny negative: clamp, streams are never negative
        P = b.relu(b.half(b.add(S, D)), hint=f"{y}::P")
        N = b.relu(b.half(b.sub(S, D)), hint=f"{y}::N")
    set_streams(comp, y, P, N, recenter)


def deflinear(op_type: str, family: str, make_map: Callable[[Compilation, onnx.NodeProto], LinearMap],
              *, shift, recenter, doc: str, **facts) -> OpSpec:
    """Declare an op that is linear in its one data input: its split and backward rules come
    from the map factory; other facts (keeps_sign, zero_n, check, …) as keywords."""

    def _split(comp: Compilation, node: onnx.NodeProto) -> None:
        split_linear(comp, make_map(comp, node), recenter)

    def _backward(comp: Compilation, node: onnx.NodeProto, rs, cts):
        lin = make_map(comp, node)
        return [(lin.x, rs.linear(cts[0], lin))]

    _split.__name__ = f"split_{op_type.lower()}"
    _backward.__name__ = f"backward_{op_type.lower()}"
    return op_spec(OpSpec(op_type, family, doc, split=_split, backward=_backward, linear_map=make_map,
                          shift=shift, recenter=recenter, **facts))


def data_inputs(comp: Compilation, node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i and comp.view.is_data(i)]
