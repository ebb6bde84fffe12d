"""Fold the scalar factors of the generated backward into the products (part of optimize).

The α-shift multiplies a pair sum by the scalar 1 − 2α at every shift point, so a
chain of elementwise Muls by scalars runs over whole activation tensors between two
transposed products (three per ReLU6 block). Scalars commute with linear maps, so:

* Mul(Mul(y, t), s)            → Mul(y, t·s)             (the inner Mul read once);
* Sum(Mul(y, s), Mul(y, t))    → Mul(y, s + t)           (both pieces of one tensor);
* Sum(Mul(x, s), Mul(y, s))    → Mul(Sum(x, y), s);
* Conv(Mul(y, s), W)           → Mul(Conv(y, W), s)      (also ConvTranspose, MatMul and Gemm
                                                          without bias), so the Mul meets the next.

A chain of products and shifts thus keeps one Mul where it meets a sum of branches.
Folding s into W instead would make the weight a per-run tensor, which onnxruntime can
no longer prepack (its blocked-layout convolutions need constant weights).

The rewritten sums differ from the original only by float rounding (a scalar product
computed first). Only rank-0 tensors count as scalars, so no rewrite changes a shape.
"""
from __future__ import annotations

import onnx
from onnx import helper

from dconnx.graph import GraphUses
from dconnx.ops.emitted import SCALAR_ELEMENTWISE, SUMS, WEIGHT_PRODUCTS


def _scalar_names(g: onnx.GraphProto) -> set[str]:
    """Rank-0 tensors: constants, graph inputs, and elementwise results of scalars only."""
    out = {t.name for t in g.initializer if len(t.dims) == 0}
    for vi in g.input:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) == 0:
            out.add(vi.name)
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" \
                and len(n.attribute[0].t.dims) == 0:
            out.add(n.output[0])
        elif n.op_type in SCALAR_ELEMENTWISE and n.input and all(i in out for i in n.input if i):
            out.add(n.output[0])
    return out


class _Folder:
    def __init__(self, g: onnx.GraphProto, serial: list[int], taken: set[str]):
        self.g = g
        self.serial, self.taken = serial, taken
        self.scalars = _scalar_names(g)
        self.uses = GraphUses(g)
        self.producer = self.uses.producer
        self.before: dict[int, list[onnx.NodeProto]] = {}
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.touched: set[int] = set()

    def _name(self) -> str:
        name = ""
        while not name or name in self.taken:
            self.serial[0] += 1
            name = f"dc/fold{self.serial[0]:x}"
        self.taken.add(name)
        return name

    def _new(self, op: str, ins: list[str], at: onnx.NodeProto) -> str:
        name = self._name()
        self.before.setdefault(id(at), []).append(helper.make_node(op, ins, [name], name=f"{name}#node"))
        return name

    def scaled(self, t: str):
        """(y, s) when t = Mul(y, s) with a rank-0 s, y not rank-0, t read once; else None."""
        n = self.producer.get(t)
        if n is None or n.op_type != "Mul" or id(n) in self.touched or self.uses.reads(t) != 1:
            return None
        a, b = n.input
        if b in self.scalars and a not in self.scalars:
            return n, a, b
        if a in self.scalars and b not in self.scalars:
            return n, b, a
        return None

    def _free(self, *nodes) -> bool:
        if any(id(n) in self.touched for n in nodes):
            return False
        self.touched.update(id(n) for n in nodes)
        return True

    def sweep(self) -> int:
        done = 0
        for n in list(self.g.node):
            if id(n) in self.touched:
                continue
            if n.op_type == "Mul":
                # Mul(Mul(y, t), s) → Mul(y, t·s)
                a, b = n.input
                y, s = (a, b) if b in self.scalars else (b, a)
                if s not in self.scalars or y in self.scalars:
                    continue
                inner = self.scaled(y)
                if inner is None or not self._free(n, inner[0]):
                    continue
                _, z, t = inner
                n.input[:] = [z, self._new("Mul", [t, s], n)]
                done += 1
            elif n.op_type in SUMS and len(n.input) == 2:
                # Sum(Mul(y, s), Mul(y, t)) → Mul(y, s + t)
                p, q = self.scaled(n.input[0]), self.scaled(n.input[1])
                if p is None or q is None or p[0] is q[0] or not (p[1] == q[1] or p[2] == q[2]) \
                        or not self._free(n, p[0], q[0]):
                    continue
                if p[1] == q[1]:
                    st = self._new("Add", [p[2], q[2]], n)
                    n.op_type = "Mul"
                    n.input[:] = [p[1], st]
                else:
                    # Sum(Mul(x, s), Mul(y, s)) → Mul(Sum(x, y), s)
                    out = n.output[0]
                    n.input[:] = [p[1], q[1]]
                    n.output[0] = self._name()
                    self.after.setdefault(id(n), []).append(
                        helper.make_node("Mul", [n.output[0], p[2]], [out], name=f"{n.output[0]}#scale"))
                done += 1
            elif n.op_type in WEIGHT_PRODUCTS and len(n.input) >= 2:
                # Conv(Mul(y, s), W) → Mul(Conv(y, W), s), no bias: the Mul moves on to meet the
                # next one (the weight stays a constant, so onnxruntime still prepacks it)
                if len(n.input) >= WEIGHT_PRODUCTS[n.op_type] and n.input[WEIGHT_PRODUCTS[n.op_type] - 1]:
                    continue
                inner = self.scaled(n.input[0])
                if inner is None or n.input[1] in self.scalars or not self._free(n, inner[0]):
                    continue
                _, y, s = inner
                out = n.output[0]
                n.input[0] = y
                n.output[0] = self._name()
                self.after.setdefault(id(n), []).append(
                    helper.make_node("Mul", [n.output[0], s], [out], name=f"{n.output[0]}#scale"))
                done += 1
        if done:
            nodes = []
            for n in self.g.node:
                nodes.extend(self.before.get(id(n), []))
                nodes.append(n)
                nodes.extend(self.after.get(id(n), []))
            del self.g.node[:]
            self.g.node.extend(nodes)
        return done


def fold_scalar_factors(model: onnx.ModelProto, prune) -> int:
    """Rewrite until nothing changes; `prune` drops the Muls no longer read. Returns the
    number of rewrites."""
    g = model.graph
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | \
        {v.name for v in g.input} | {n.name for n in g.node}
    total, serial = 0, [0]
    while True:
        done = _Folder(g, serial, taken).sweep()
        if not done:
            return total
        total += done
        prune(model)
