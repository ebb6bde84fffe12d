"""Pieces shared by the op families: linear maps, weight variants, stream bookkeeping.

Most canonical ops are linear in their one data input at fixed masks. Such an
op is described by a `LinearMap` that knows how to apply itself (forward) and
its transpose (backward) with a chosen weight variant:

    "W"    the weight itself          "abs"  |W|
    "pos"  W⁺ = max(W, 0)             "neg"  W⁻ = max(−W, 0)
    "gamma=<g>"  W + g·W⁺  (LRP-γ)

`deflinear` declares such an op's OpSpec, its split and backward rules built
from one map factory, as JAX's `deflinear` does for linear primitives.

Which weight-derived tensors the session holds (option `weight_variants`):

    "session"      W and |W| only, |W| folded once at session start: a signed-weight
                   map's W⁺ and W⁻ products are the half-sum and half-difference of its
                   W and |W| products, W⁺x = ½(|W|x + Wx), W⁻x = ½(|W|x − Wx), and a
                   convolution's adjoint reads the same tensors (no flipped copies).
    "per-run"      W only: each weight with a variant is an overridable initializer, so
                   the runtime cannot fold what is computed from it; |W| is recomputed on
                   every run (least memory, slower).
    "adjoints"     W and |W| as in "session", and a stride-1 convolution's adjoint kernels
                   (W and |W| flipped, channels swapped) folded too: the adjoint is a Conv,
                   which onnxruntime runs faster than the ConvTranspose of "session"
                   (benchmarks/RESULTS.md), for two more copies of each such kernel.
    "precomputed"  every variant the rules use (W⁺, W⁻, flipped adjoint kernels) folded
                   at session start (fastest; up to five copies of a convolution weight).
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper

from ..compilation import Compilation, StreamPair
from ..ir import attrs
from .registry import OpSpec, op_spec

NONNEG_VARIANTS = ("W", "abs", "pos")


SIGNED_PARTS = ("pos", "neg")


def weight_variant(comp: Compilation, w: str, variant: str) -> str:
    """A variant of a constant tensor, computed in the graph from the original
    initializer (the file keeps one copy): folded once at session start, or on every run
    where `weight_variants` is "per-run" (the initializer is made overridable)."""
    if variant == "W":
        return w
    if comp.opts.weight_variants == "per-run":
        computed_per_run(comp, w)
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


def computed_per_run(comp: Compilation, w: str) -> None:
    """List the initializer w among the graph inputs (an overridable initializer with its
    stored value as default): onnxruntime folds only constants, so what is computed from w
    is computed on every run and never held by the session."""
    init = comp.view.initializers.get(w)
    if init is None:
        return      # computed from other constants (a flipped kernel): per run where they are

    def declare():
        comp.new_inputs.append(helper.make_tensor_value_info(w, init.data_type, list(init.dims)))
        return w
    comp.cached(("per_run", w), declare)


def signed_part(comp: Compilation, product: Callable[[str, str], str], x: str, variant: str,
                key: tuple) -> str:
    """W⁺x = ½(|W|x + Wx) or W⁻x = ½(|W|x − Wx) from the W and |W| products of x (each
    built once per x and shared by both parts): the session keeps W and |W|, not W⁺, W⁻."""
    b = comp.b
    s = comp.cached(key + (x, "abs"), lambda: product(x, "abs"))
    d = comp.cached(key + (x, "W"), lambda: product(x, "W"))
    return b.half(b.add(s, d) if variant == "pos" else b.sub(s, d))


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

    def _products(self, product: Callable[[str, str], str], x: str, variant: str, key: str) -> str:
        """product(x, variant) for a signed weight: W⁺/W⁻ as half-sums and half-differences of
        the W and |W| products unless every variant is precomputed or the caller folds the signed
        parts (Compilation.folding_signed_parts); each product built once."""
        k = ("product", self.y, key)
        if variant in SIGNED_PARTS and self.comp.opts.weight_variants != "precomputed" \
                and not self.comp.fold_signed_parts:
            return signed_part(self.comp, product, x, variant, k)
        return self.comp.cached(k + (x, variant), lambda: product(x, variant))

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
