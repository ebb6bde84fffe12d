"""Preflight: find every node dconnx cannot convert, before any rewriting.

All problems are reported at once in one UnsupportedOpError, each with the
node's name, its op type and the reason.
"""
from __future__ import annotations

import numpy as np
import onnx

from dconnx.errors import InvalidModelError, UnsupportedOpError
from dconnx.graph import ModelView
from dconnx.ir import FLOAT_TYPES, attrs, node_label
from dconnx.ops import CANONICALIZED, SUPPORTED, UNSUPPORTED

from . import Pass, PassResult

# ops that may appear on integer (shape) tensors or constants; never split
SHAPE_OPS = {"Shape", "Gather", "Cast", "Concat", "Unsqueeze", "Squeeze", "Slice", "ConstantOfShape",
             "Range", "Mul", "Add", "Sub", "Div", "Equal", "Where", "Size", "Reshape", "Expand",
             "ReduceProd", "Constant", "Identity", "Min", "Max", "Neg", "Floor", "Ceil", "Abs",
             "Transpose", "Tile", "Split", "Not", "Greater", "Less", "GatherElements", "Sqrt"}


def _reason(view: ModelView, node: onnx.NodeProto, final: bool = False) -> str | None:
    """Why this node cannot be converted, or None when it can.

    Before canonicalization (`final=False`) constants computed by foldable
    subgraphs are not known yet, so checks that need them wait for `final`."""
    op = node.op_type
    data_in = [i for i in node.input if i and view.is_data(i)]
    data_out = [o for o in node.output if o and o in view.data_tensors]
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}' is not supported"
    if not data_in:
        return None          # constant or shape arithmetic: folded or left alone
    if not any(view.is_float(o) for o in data_out):
        if op in ("Shape", "Size"):
            return None
        return "produces a non-float tensor from data (not differentiable)"
    if op in UNSUPPORTED:
        return UNSUPPORTED[op]
    if op not in SUPPORTED and op not in CANONICALIZED:
        return "no DC rule for this op"
    a = attrs(node)
    if op in ("Mul", "Div", "MatMul", "Gemm", "Conv", "Max", "PRelu") and len(data_in) > 1:
        return "product of two data-dependent tensors is not DC-splittable by these rules"
    if op == "Div" and not view.is_data(node.input[0]):
        return "division by a data-dependent tensor is not supported"
    if op in ("Conv", "Gemm", "MatMul", "BatchNormalization", "PRelu"):
        for i in node.input[1:]:
            if i and not view.is_const(i) and i not in view.data_tensors and not _foldable(view, i):
                return f"parameter '{i}' is not a constant"
        if op == "Conv" and view.is_data(node.input[1]):
            return "the weight depends on the data"
        if op == "MatMul":
            if not view.is_data(node.input[0]):
                return "only data @ constant is supported (constant @ data is not)"
            wshape = view.shape(node.input[1])
            if wshape is None or len(wshape) != 2:
                return "only a rank-2 constant right operand is supported"
        if op == "Gemm" and int(a.get("transA", 0)):
            return "transA=1 would put the batch axis second"
        if op == "BatchNormalization" and int(a.get("training_mode", 0)):
            return "training-mode BatchNormalization"
    if op == "Max":
        consts = [view.const(i) for i in node.input if not view.is_data(i)]
        if len(node.input) != 2 or not consts or (final and consts[0] is None) or \
                (consts[0] is not None and np.any(consts[0] != 0)):
            return "only Max(x, 0) (a Relu) is supported"
    if op == "Clip":
        for i in node.input[1:]:
            if i and view.is_data(i):
                return "clip bounds depend on the data"
    if op == "LeakyRelu" and not (0.0 <= float(a.get("alpha", 0.01)) < 1.0):
        return "LeakyRelu slope must be in [0, 1)"
    if op == "Pad":
        if a.get("mode", "constant") != "constant":
            return f"pad mode '{a.get('mode')}' is not supported (constant 0 only)"
        if len(node.input) > 2 and node.input[2]:
            v = view.const(node.input[2])
            if (v is None and final) or (v is not None and np.any(v != 0)):
                return "only zero padding is supported"
        pads = view.const(node.input[1]) if len(node.input) > 1 and node.input[1] else \
            np.asarray(a.get("pads", []))
        if pads is not None and np.any(np.asarray(pads) < 0):
            return f"negative pads {np.asarray(pads).tolist()} (cropping) are not supported"
    if op == "MaxPool" and int(a.get("storage_order", 0)) and _indices_used(view, node):
        return ("storage_order=1 (column-major Indices) with its Indices output used by the graph "
                "is not supported")
    if op == "AveragePool" and int(a.get("ceil_mode", 0)) and final and _partial_windows(view, node):
        return ("ceil_mode with partial windows at the end of an axis is not supported "
                "(onnxruntime's divisor there is not the window's size); export with ceil_mode=0")
    if op in ("Add", "Sub", "Mul", "Div") and len(data_in) == 1 and _broadcasts_up(
            view.shape(data_in[0]), view.shape(node.output[0])):
        return (f"the constant operand broadcasts the data tensor up from {view.shape(data_in[0])} "
                f"to {view.shape(node.output[0])} (only constants that broadcast to the data's "
                "shape are supported)")
    if op == "Slice" and len(node.input) > 4 and node.input[4]:
        steps = view.const(node.input[4])
        if (steps is None and final) or (steps is not None and np.any(steps != 1)):
            return "only unit steps are supported"
    if op == "Transpose" and list(a.get("perm", [0]))[:1] != [0]:
        return "the permutation moves the batch axis"
    if op in ("Concat", "Split") and int(a.get("axis", 0)) == 0:
        return "operates along the batch axis"
    if op == "Flatten" and int(a.get("axis", 1)) != 1:
        return "flattening must keep the batch axis (axis=1)"
    if op in ("Add", "Sub") and len(data_in) == 2:
        s0, s1 = view.shape(node.input[0]), view.shape(node.input[1])
        # before canonicalization a Pad/Reshape with computed arguments leaves symbolic dims
        # ('unk__4' vs 'unk__6') that may still be equal: compare those on the final graph
        known = all(s is not None and all(isinstance(d, int) for d in s[1:]) for s in (s0, s1))
        if s0 != s1 and (final or known):
            return f"broadcasting between data tensors ({s0} vs {s1}) is not supported"
    if op in ("Softmax", "LogSoftmax"):
        outs = set(view.output_names)
        if not any(o in outs for o in node.output):
            return "Softmax is only supported as the last op (the maps explain its input)"
    if op in ("ReduceMean", "ReduceSum"):
        axes = view.reduce_axes(node)
        if axes is None and final:
            return "the reduced axes are not constant"
        if axes is not None and (not axes or 0 in axes):
            return "reduces over the batch axis"
    if not final:
        return None
    for o in data_out:
        shape = view.shape(o)
        if shape is None:
            return f"output '{o}' has no inferred shape"
        if any(not isinstance(d, int) for d in shape[1:]):
            return f"output '{o}' has a dynamic non-batch dimension {shape} (only the batch axis may be dynamic)"
    return None


def _indices_used(view: ModelView, node: onnx.NodeProto) -> bool:
    """Whether a MaxPool's Indices output is read by another node or is a graph output."""
    idx = node.output[1] if len(node.output) > 1 else ""
    return bool(idx) and (bool(view.consumers.get(idx)) or idx in set(view.output_names))


def _broadcasts_up(s_in, s_out) -> bool:
    """Whether an elementwise op's output is bigger than its data operand: a higher rank, or an
    axis that is known on both sides and larger (symbolic dims, e.g. behind a Pad with computed
    pads before canonicalization, are compared on the canonical graph, where they are static)."""
    if s_in is None or s_out is None:
        return False
    if len(s_out) > len(s_in):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and b > a for a, b in zip(s_in, s_out))


def _partial_windows(view: ModelView, node: onnx.NodeProto) -> bool:
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


def _foldable(view: ModelView, name: str) -> bool:
    return name not in view.data_tensors


def check_final(comp) -> None:
    """The attribute- and shape-level checks, on the canonical graph (constants folded)."""
    problems = []
    for node in comp.model.graph.node:
        why = _reason(comp.view, node, final=True)
        if why:
            problems.append((node_label(node), node.op_type, why))
    if problems:
        raise UnsupportedOpError(problems)


class Preflight(Pass):
    name = "preflight"

    def run(self, comp) -> PassResult:
        view = comp.view
        res = PassResult(self.name)
        inputs = view.data_inputs
        if not inputs:
            raise InvalidModelError("the model has no data input")
        for inp in inputs:
            et = inp.type.tensor_type.elem_type
            if et not in FLOAT_TYPES:
                raise InvalidModelError(
                    f"input '{inp.name}' has element type {onnx.TensorProto.DataType.Name(et)}; "
                    "dconnx explains float inputs only")
            shape = view.shape(inp.name) or []
            dynamic = [(k, d) for k, d in enumerate(shape) if k > 0 and not isinstance(d, int)]
            if dynamic:
                k, d = dynamic[0]
                raise InvalidModelError(
                    f"input '{inp.name}' has a dynamic dimension '{d}' on axis {k}; dconnx needs a fixed "
                    "size on every axis but the batch axis: export the model with a fixed input size")
        problems = []
        seen_names = set()
        for node in comp.model.graph.node:
            if node.name and node.name in seen_names:
                problems.append((node_label(node), node.op_type, "duplicate node name"))
            seen_names.add(node.name)
            why = _reason(view, node)
            if why:
                problems.append((node_label(node), node.op_type, why))
        if problems:
            raise UnsupportedOpError(problems)
        res.notes.append(f"{len(comp.model.graph.node)} nodes checked")
        return res
