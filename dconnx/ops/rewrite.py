"""The node writer canonicalization's op rewrites share: a node's exact replacement as a list of
new nodes, with fresh names derived from the node's own and constants in the node's float type."""
from __future__ import annotations

import numpy as np
from onnx import helper


class NodeWriter:
    """Writes the replacement nodes of `node` (read them from `.nodes`)."""

    def __init__(self, view, node, fresh, add_init):
        self.fresh, self.add_init = fresh, add_init
        self.y = node.output[0]
        self.base = node.name or self.y
        self.dtype = helper.tensor_dtype_to_np_dtype(view.dtypes.get(self.y, 1))
        self.nodes: list = []

    def op(self, op_type: str, ins: list, out: str | None = None, **attrs) -> str:
        """Append one node; its output is `out` (the replaced node's output, for the last one) or
        a fresh name."""
        out = out or self.fresh(f"{self.y}_{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, ins, [out], name=self.fresh(f"{self.base}_{op_type.lower()}"),
                                           **attrs))
        return out

    def const(self, value, suffix: str, dtype=None) -> str:
        """A constant initializer, in the node's float type unless `dtype` is given."""
        return self.add_init(np.asarray(value, dtype or self.dtype), f"{self.y}_{suffix}")

    def scaled(self, x: str, s: float, out: str | None = None) -> str:
        return self.op("Mul", [x, self.const(s, "scale")], out)
