"""Graph-building helpers used by every pass: unique names, nodes, constants.

A `GraphBuilder` collects new nodes and initializers for one graph. Names are
unique against everything already in the model; constants are deduplicated.
Shape-like helpers assume the opset is at least 17 (the converted model's
minimum, see `dconnx.io.MIN_OPSET`).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}
NP_TO_ONNX = {np.dtype(v): k for k, v in ONNX_TO_NP.items()}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


def attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes as a plain dict of Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def node_label(node: onnx.NodeProto) -> str:
    """How errors and reports name a node: its name, or its first output when unnamed."""
    return node.name or (f"<unnamed {node.op_type} -> {node.output[0]}>" if node.output else
                         f"<unnamed {node.op_type}>")


_SAFE = re.compile(r"[^A-Za-z0-9_.:/\-]+")


class GraphBuilder:
    """Collects nodes and initializers with names unique in the model."""

    def __init__(self, taken: Iterable[str] = (), float_dtype=np.float32, prefix: str = "dc",
                 readable: bool = False):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken: set[str] = set(taken)
        self._counter: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.float_dtype = np.dtype(float_dtype)
        self.prefix = prefix
        self.opset = 17
        # compact names ("dc/12") keep big graphs within a few % of the original file;
        # readable ones ("dc/<tensor>::convT.abs") help when reading a converted graph
        self.readable = readable
        self._serial = 0

    # -- names -------------------------------------------------------------
    def fresh(self, hint: str, exact: bool = False) -> str:
        """A name not used anywhere in the model, derived from `hint`.

        Generated names live under the builder's prefix ("dc/..."); `exact` keeps the
        hint as the preferred name (outputs and inputs of the converted model)."""
        if exact:
            base = hint or "t"
        elif not self.readable:
            while True:
                self._serial += 1
                cand = f"{self.prefix}/{self._serial:x}"
                if cand not in self._taken:
                    self._taken.add(cand)
                    return cand
        else:
            base = _SAFE.sub("_", hint) or "t"
            if not base.startswith(self.prefix + "/"):
                base = f"{self.prefix}/{base}"
        if base not in self._taken:
            self._taken.add(base)
            return base
        i = self._counter.get(base, 0)
        while True:
            i += 1
            cand = f"{base}__{i}"
            if cand not in self._taken:
                self._counter[base] = i
                self._taken.add(cand)
                return cand

    def reserve(self, name: str) -> str:
        """Claim an exact name (e.g. a graph output); fails if it is taken."""
        if name in self._taken:
            raise ValueError(f"tensor name '{name}' is already used in the model")
        self._taken.add(name)
        return name

    # -- nodes -------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], *, out: str | Sequence[str] | int = 1,
           hint: str | None = None, domain: str = "", **attributes):
        """Append a node. `out` is a number of outputs or explicit output names.
        Returns the output name (one output) or the list of names."""
        hint = hint or f"{self.prefix}/{op_type}"
        if isinstance(out, int):
            outs = [self.fresh(hint if out == 1 else f"{hint}.{i}") for i in range(out)]
        elif isinstance(out, str):
            outs = [out]
        else:
            outs = list(out)
        attributes = {k: v for k, v in attributes.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{hint}#node"),
                                domain=domain or None, **attributes)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    # -- constants ---------------------------------------------------------
    def const(self, value, dtype=None, hint: str = "c") -> str:
        """An initializer holding `value`; identical small constants are shared."""
        if dtype is None and not isinstance(value, np.ndarray):
            dtype = self.float_dtype
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 64:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(f"{self.prefix}/{hint}")
        self.initializers.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._consts[key] = name
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint=hint)

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, dtype=self.float_dtype), hint="s")

    # -- elementwise shorthands -------------------------------------------
    def add(self, a, b, hint=None):
        return self.op("Add", [a, b], hint=hint)

    def sub(self, a, b, hint=None):
        return self.op("Sub", [a, b], hint=hint)

    def mul(self, a, b, hint=None):
        return self.op("Mul", [a, b], hint=hint)

    def div(self, a, b, hint=None):
        return self.op("Div", [a, b], hint=hint)

    def neg(self, a, hint=None):
        return self.op("Neg", [a], hint=hint)

    def relu(self, a, hint=None):
        return self.op("Relu", [a], hint=hint)

    def abs(self, a, hint=None):
        return self.op("Abs", [a], hint=hint)

    def half(self, a, hint=None):
        return self.mul(a, self.scalar(0.5), hint=hint)

    def cast(self, a, to: int, hint=None):
        return self.op("Cast", [a], to=to, hint=hint)

    def concat(self, xs: Sequence[str], axis: int, hint=None):
        if len(xs) == 1:
            return xs[0]
        return self.op("Concat", list(xs), axis=axis, hint=hint)

    def split(self, x: str, sizes: Sequence[int], axis: int, hint=None) -> list[str]:
        outs = self.op("Split", [x, self.ints(sizes)], out=len(sizes), axis=axis, hint=hint)
        return outs if isinstance(outs, list) else [outs]

    def reshape(self, x: str, shape: Sequence[int], hint=None):
        return self.op("Reshape", [x, self.ints(shape)], hint=hint)

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int, hint=None):
        return self.op("ReduceSum", [x, self.ints(axes)], keepdims=keepdims, hint=hint)

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int, hint=None):
        """ReduceMax/Min/Mean/...: axes as an attribute before opset 18, as an input after."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.op(op, [x, self.ints(axes)], keepdims=keepdims, hint=hint)
        return self.op(op, [x], axes=list(axes), keepdims=keepdims, hint=hint)

    def unsqueeze(self, x: str, axes: Sequence[int], hint=None):
        return self.op("Unsqueeze", [x, self.ints(axes)], hint=hint)

    def squeeze(self, x: str, axes: Sequence[int], hint=None):
        return self.op("Squeeze", [x, self.ints(axes)], hint=hint)

    def slice(self, x: str, starts, ends, axes, steps=None, hint=None):
        ins = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            ins.append(self.ints(steps))
        return self.op("Slice", ins, hint=hint)

    def shape_of(self, x: str, start: int | None = None, end: int | None = None, hint=None):
        kw = {}
        if start is not None:
            kw["start"] = start
        if end is not None:
            kw["end"] = end
        return self.op("Shape", [x], hint=hint or f"{self.prefix}/shape", **kw)

    def zeros_like(self, x: str, hint=None):
        return self.mul(x, self.scalar(0.0), hint=hint)


def value_info(name: str, elem_type: int, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))
