"""Preflight: find every node dconnx cannot convert, before any rewriting.

All problems are reported at once in one UnsupportedOpError, each with the
node's name, its op type and the reason.
"""
from __future__ import annotations

import onnx

from dconnx.errors import InvalidModelError, UnsupportedOpError
from dconnx.graph import ModelView
from dconnx.ir import FLOAT_TYPES, attrs, node_label
from dconnx.ops import METADATA_ONLY, SPECS
from dconnx.ops.fused import find_fusions, fused_interior

from . import Pass, PassResult


def _reason(view: ModelView, node: onnx.NodeProto, final: bool = False) -> str | None:
    """Why this node cannot be converted, or None when it can.

    The generic checks are here; the op's own (attributes, operands) is its OpSpec's `check`.
    Before canonicalization (`final=False`) constants computed by foldable subgraphs are not
    known yet, so checks that need them wait for `final`."""
    op = node.op_type
    data_in = [i for i in node.input if i and view.is_data(i)]
    data_out = [o for o in node.output if o and o in view.data_tensors]
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}' is not supported"
    if not data_in:
        return None          # constant or shape arithmetic: folded or left alone
    if not any(view.is_float(o) for o in data_out):
        if op in METADATA_ONLY:
            return None
        return "produces a non-float tensor from data (not differentiable)"
    spec = SPECS.get(op)
    if spec is not None and spec.refused is not None:
        return spec.refused
    if spec is None or not (spec.supported or spec.becomes is not None):
        return "no DC rule for this op"
    if spec.check is not None:
        why = spec.check(view, node, data_in, final)
        if why:
            return why
    if not final:
        return None
    for o in data_out:
        shape = view.shape(o)
        if shape is None:
            return f"output '{o}' has no inferred shape"
        if any(not isinstance(d, int) for d in shape[1:]):
            return f"output '{o}' has a dynamic non-batch dimension {shape} (only the batch axis may be dynamic)"
    return None


def fused_nodes(view: ModelView) -> set[str]:
    """The inner nodes of activations exported as subgraphs (SiLU as x·Sigmoid(x), GELU's erf
    form, …): the subgraph is converted as one activation, so they are not checked one by one."""
    return fused_interior(find_fusions(view))


def check_final(comp) -> None:
    """The attribute- and shape-level checks, on the canonical graph (constants folded)."""
    problems = []
    inner = fused_nodes(comp.view)
    for node in comp.model.graph.node:
        if (node.name or node.output[0]) in inner:
            continue
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
        inner = fused_nodes(view)
        for node in comp.model.graph.node:
            if node.name and node.name in seen_names:
                problems.append((node_label(node), node.op_type, "duplicate node name"))
            seen_names.add(node.name)
            why = None if (node.name or node.output[0]) in inner else _reason(view, node)
            if why:
                problems.append((node_label(node), node.op_type, why))
        if problems:
            raise UnsupportedOpError(problems)
        res.notes.append(f"{len(comp.model.graph.node)} nodes checked")
        return res

    def ensures(self, comp):
        """Nothing unsupported is left: every node computing a float tensor from data has rules
        or is rewritten by canonicalization (or reads only its input's shape)."""
        view = comp.view
        inner = fused_nodes(view)
        for node in comp.model.graph.node:
            if not any(i and view.is_data(i) for i in node.input) or (node.name or node.output[0]) in inner:
                continue
            if not any(o and o in view.data_tensors and view.is_float(o) for o in node.output):
                continue
            spec = SPECS.get(node.op_type)
            if node.op_type in METADATA_ONLY:
                continue
            if spec is None or spec.refused is not None or not (spec.supported or spec.becomes):
                raise self.broken(f"{node_label(node)} ({node.op_type}) passed preflight but has no rule")
