"""Read-only queries over a model: producers, consumers, constants, shapes."""
from __future__ import annotations

from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from .ir import FLOAT_TYPES, attrs


def _dims(type_proto: onnx.TypeProto):
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


class GraphUses:
    """Who writes and who reads each tensor of one graph (build anew after editing it).

    `consumers[t]` lists a node once per input slot that reads t; `reads(t)` counts a graph
    output as two more reads, so that a rewrite looking for "read once" never folds one away."""

    def __init__(self, g: onnx.GraphProto):
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.outputs = {o.name for o in g.output}

    def reads(self, t: str) -> int:
        return len(self.consumers.get(t, ())) + (2 if t in self.outputs else 0)

    def only(self, t: str, op: str) -> list[onnx.NodeProto] | None:
        """The consumers of t when all are `op` and t is no graph output."""
        users = self.consumers.get(t, [])
        if t in self.outputs or not all(u.op_type == op for u in users):
            return None
        return users


class ModelView:
    """Indexes of one model's main graph. Build a new view after editing the model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        uses = GraphUses(self.graph)
        self.producer, self.consumers = uses.producer, uses.consumers
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.shapes: dict[str, list | None] = {}
        self.dtypes: dict[str, int] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            self.shapes[vi.name] = _dims(vi.type)
            if vi.type.HasField("tensor_type"):
                self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for t in self.graph.initializer:
            self.shapes[t.name] = list(t.dims)
            self.dtypes[t.name] = t.data_type
        self.output_names = [o.name for o in self.graph.output]

    @cached_property
    def data_inputs(self) -> list[onnx.ValueInfoProto]:
        """Graph inputs that are fed at run time (not overridable initializers)."""
        return [i for i in self.graph.input if i.name not in self.initializers]

    @cached_property
    def _const_cache(self) -> dict[str, np.ndarray]:
        return {}

    def is_const(self, name: str) -> bool:
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        if name in self._const_cache:
            return self._const_cache[name]
        val = None
        if name in self.initializers:
            val = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                a = attrs(node)
                if "value" in a:
                    val = numpy_helper.to_array(a["value"])
                elif "value_float" in a:
                    val = np.asarray(a["value_float"], dtype=np.float32)
                elif "value_floats" in a:
                    val = np.asarray(a["value_floats"], dtype=np.float32)
                elif "value_int" in a:
                    val = np.asarray(a["value_int"], dtype=np.int64)
                elif "value_ints" in a:
                    val = np.asarray(a["value_ints"], dtype=np.int64)
        if val is not None:
            self._const_cache[name] = val
        return val

    def shape(self, name: str) -> list | None:
        return self.shapes.get(name)

    def static_shape(self, name: str, allow_batch: bool = True) -> list | None:
        """Shape with every dim but (optionally) the first known as int, else None."""
        s = self.shapes.get(name)
        if s is None:
            return None
        rest = s[1:] if allow_batch else s
        if any(not isinstance(d, int) for d in rest):
            return None
        return s

    def is_float(self, name: str) -> bool:
        return self.dtypes.get(name) in FLOAT_TYPES

    def is_data(self, name: str) -> bool:
        """A float tensor that depends on a graph input (what the split rewrites)."""
        return bool(name) and self.is_float(name) and name in self.data_tensors

    @cached_property
    def data_tensors(self) -> set[str]:
        """Names of tensors that depend on a data graph input."""
        live = {i.name for i in self.data_inputs}
        for node in self.graph.node:
            if any(i in live for i in node.input if i):
                live.update(o for o in node.output if o)
        return live

    def reduce_axes(self, node: onnx.NodeProto) -> list[int] | None:
        """The normalized axes of a Reduce* node (attribute or input form); None if unknown,
        [] for "all axes" (empty axes without noop_with_empty_axes)."""
        a = attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            if c is None:
                return None
            axes = [int(v) for v in c.reshape(-1)]
        rank = self.rank(node.input[0])
        if rank is None:
            return None
        if not axes:
            return [] if not int(a.get("noop_with_empty_axes", 0)) else None
        return sorted(int(v) % rank for v in axes)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)
