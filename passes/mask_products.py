"""Masked cotangents as products (part of optimize): Where(m, a, 0) → a · float(m).

A ReLU's backward keeps its cotangent where the mask holds and zeros it elsewhere.
onnxruntime's Where walks its three operands through a general broadcasting loop,
about twice the time of a Cast of the mask and a vectorized Mul (measured on the
MobileNetV2 activation shapes, benchmarks/RESULTS.md). For a finite cotangent the two
agree exactly (up to the sign of a zero); the float mask is built once per mask. A Where
that guards a quotient (LRP's ratios at ε = 0, where 0·inf would be NaN) stays: only
cotangents that sums, products with weights and moves produce are rewritten.

Then a sum with one negated masked piece, Sum(x, Neg(d) · m) (the upper ReLU of a
ReLU6 = Relu(x) − Relu(x − 6)), becomes Sub(x, d · m): the same numbers (negation is
exact) without a pass over the tensor for the Neg.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from dconnx.graph import GraphUses
from dconnx.ops.emitted import FINITE_PRESERVING, SUMS, VALUE_MOVES


def _float_scalars(g: onnx.GraphProto) -> dict[str, tuple[float, int]]:
    """Rank-0 float initializers → (value, element type)."""
    return {t.name: (float(numpy_helper.to_array(t)), t.data_type) for t in g.initializer
            if len(t.dims) == 0 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                    onnx.TensorProto.FLOAT16)}


def _zero_scalars(g: onnx.GraphProto) -> dict[str, int]:
    """Rank-0 float initializers equal to 0 → their element type."""
    return {name: dtype for name, (v, dtype) in _float_scalars(g).items() if v == 0.0}


def _finite_source(t: str, producer: dict) -> bool:
    """True when t is a graph input or constant, or computed by a finite-preserving op (through
    moves)."""
    for _ in range(64):
        n = producer.get(t)
        if n is None:
            return True
        if n.op_type not in VALUE_MOVES:
            return n.op_type in FINITE_PRESERVING
        t = n.input[0]
    return False


def where_to_mul(model: onnx.ModelProto) -> int:
    g = model.graph
    zeros = _zero_scalars(g)
    producer = GraphUses(g).producer
    if not zeros:
        return 0
    outputs = {o.name for o in g.output}
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {v.name for v in g.input}
    floats: dict[tuple[str, int], str] = {}
    nodes, done = [], 0
    for n in g.node:
        if n.op_type == "Where" and len(n.input) == 3 and n.input[2] in zeros and n.input[1] not in zeros \
                and _finite_source(n.input[1], producer) and n.output[0] not in outputs:
            m, a, z = n.input
            key = (m, zeros[z])
            if key not in floats:
                name, i = f"{m}::float", 0
                while name in taken:
                    i += 1
                    name = f"{m}::float{i}"
                taken.add(name)
                nodes.append(helper.make_node("Cast", [m], [name], to=zeros[z], name=f"{name}#node"))
                floats[key] = name
            n.op_type = "Mul"
            n.input[:] = [a, floats[key]]
            done += 1
        nodes.append(n)
    if done:
        del g.node[:]
        g.node.extend(nodes)
    return done + _sub_negated(g)


def _sub_negated(g: onnx.GraphProto) -> int:
    """Sum(x, Mul(Neg(d), m)) → Sub(x, Mul(d, m)), each intermediate read once."""
    uses = GraphUses(g)
    producer = uses.producer
    done, used = 0, set()
    for n in g.node:
        if n.op_type not in SUMS or len(n.input) != 2 or n.input[0] == n.input[1]:
            continue
        for k in (1, 0):
            mul = producer.get(n.input[k])
            if mul is None or mul.op_type != "Mul" or uses.reads(n.input[k]) != 1 or id(mul) in used:
                continue
            j = next((j for j, t in enumerate(mul.input) if t in producer and producer[t].op_type == "Neg"
                      and uses.reads(t) == 1 and id(producer[t]) not in used), None)
            if j is None:
                continue
            neg = producer[mul.input[j]]
            mul.input[j] = neg.input[0]
            n.op_type = "Sub"
            n.input[:] = [n.input[1 - k], n.input[k]]
            used.update((id(mul), id(neg)))
            done += 1
            break
    if done:
        live = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if not (n.op_type == "Neg" and id(n) in used and n.output[0] not in live)]
        del g.node[:]
        g.node.extend(keep)
    return done
