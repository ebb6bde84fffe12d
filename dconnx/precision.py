"""Changing the float precision of a whole model (float32 ⇄ float16 / float64).

`cast_model` rewrites every float tensor of the graph — initializers, graph
inputs and outputs, Cast targets, tensor attributes — to one float type.
With `keep_io=True` the graph's float inputs and outputs keep their type and
Cast nodes at the boundary convert (a float16 model that callers feed float32).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from .ops import FLOAT16_MISSING
from .ops.resample import FIXED_FLOAT32_OPERANDS

FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _retype(value_infos, to: int) -> None:
    for vi in value_infos:
        if vi.type.tensor_type.elem_type in FLOATS:
            vi.type.tensor_type.elem_type = to


# onnxruntime's CPU provider has no float16 ScatterElements with reduction "add"
KEEP_FLOAT32 = {TensorProto.FLOAT16: FLOAT16_MISSING}


def cast_model(model: onnx.ModelProto, to: int, keep_io: bool = False) -> onnx.ModelProto:
    """A copy of `model` computing in float type `to` (TensorProto.FLOAT16/FLOAT/DOUBLE);
    the few ops a runtime lacks in that type (KEEP_FLOAT32) run in float32 between Casts."""
    np_to = helper.tensor_dtype_to_np_dtype(to)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    boundary = {vi.name for vi in g.input} if keep_io else set()
    fixed = _fixed_float32(g)
    for t in g.initializer:
        if t.data_type in FLOATS and t.data_type != to and t.name not in boundary | fixed:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np_to), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i in FLOATS and not set(node.output) & fixed:
                a.i = to
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOATS and \
                    not set(node.output) & fixed:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np_to), a.t.name))
    del g.value_info[:]
    if not keep_io:
        _retype(g.input, to)
        _retype(g.output, to)
        return m
    casts_in, casts_out = [], []
    for vi in g.input:     # data inputs and overridable defaults (alpha) alike keep their type
        et = vi.type.tensor_type.elem_type
        if et in FLOATS and et != to:
            inner = f"{vi.name}::{helper.tensor_dtype_to_np_dtype(to).name}"
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[i] = inner
            casts_in.append(helper.make_node("Cast", [vi.name], [inner], to=to, name=f"cast_in/{vi.name}"))
    for vi in g.output:
        et = vi.type.tensor_type.elem_type
        if et in FLOATS and et != to:
            inner = f"{vi.name}::{helper.tensor_dtype_to_np_dtype(to).name}"
            for node in g.node:
                for i, name in enumerate(node.output):
                    if name == vi.name:
                        node.output[i] = inner
                for i, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[i] = inner
            casts_out.append(helper.make_node("Cast", [inner], [vi.name], to=et, name=f"cast_out/{vi.name}"))
    nodes = casts_in + _float32_islands(list(g.node), to) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    return m


def _fixed_float32(g) -> set[str]:
    """Float operands whose type the op fixes (Resize's roi and scales are float32 in every
    model) and the constant subgraph that computes them (an export without folding)."""
    fixed = {node.input[i] for node in g.node for i in FIXED_FLOAT32_OPERANDS.get(node.op_type, ())
             if i < len(node.input) and node.input[i]}
    producer = {o: node for node in g.node for o in node.output}
    stack = list(fixed)
    while stack:
        node = producer.get(stack.pop())
        if node is not None:
            new = [i for i in node.input if i and i not in fixed]
            fixed.update(new)
            stack += new
    return fixed


def type_name(t: int) -> str:
    """'float16', 'float', 'double', 'bfloat16': an ONNX float type's name."""
    return TensorProto.DataType.Name(t).lower()


def foreign_float_types(model: onnx.ModelProto, to: int) -> list[str]:
    """What in `model` holds or produces a float type other than `to` (the op-fixed Resize
    operands aside): Casts to another float type, initializers and graph outputs, one line each."""
    g = model.graph
    fixed = _fixed_float32(g)
    found = []
    for node in g.node:
        if node.op_type == "Cast" and not set(node.output) & fixed:
            t = next(a.i for a in node.attribute if a.name == "to")
            if t in FLOATS and t != to:
                found.append(f"Cast '{node.name or node.output[0]}' to {type_name(t)}")
    for t in g.initializer:
        if t.data_type in FLOATS and t.data_type != to and t.name not in fixed:
            found.append(f"initializer '{t.name}' ({type_name(t.data_type)})")
    for vi in g.output:
        et = vi.type.tensor_type.elem_type
        if et in FLOATS and et != to:
            found.append(f"output '{vi.name}' ({type_name(et)})")
    return found


def _float32_islands(nodes, to):
    keep = KEEP_FLOAT32.get(to, ())
    out = []
    for node in nodes:
        if node.op_type not in keep:
            out.append(node)
            continue
        for i in (0, 2):   # data and updates; indices stay int64
            wide = f"{node.input[i]}::f32"
            out.append(helper.make_node("Cast", [node.input[i]], [wide], to=TensorProto.FLOAT))
            node.input[i] = wide
        narrow = node.output[0]
        node.output[0] = f"{narrow}::f32"
        out.append(node)
        out.append(helper.make_node("Cast", [node.output[0]], [narrow], to=to))
    return out


def float_type_of(model: onnx.ModelProto) -> int:
    for vi in model.graph.input:
        et = vi.type.tensor_type.elem_type
        if et in FLOATS:
            return et
    return TensorProto.FLOAT

