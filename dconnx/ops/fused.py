"""Activations that exporters write as small subgraphs, converted as one activation.

SiLU as `x * Sigmoid(x)`, Mish as `x * Tanh(Softplus(x))`, HardSwish as
`x * HardSigmoid(x; 1/6, 1/2)` and GELU's erf form `(x · (1 + erf(x/√2))) · 0.5` or
`(0.5 · x) · (1 + erf(x/√2))` are recognised at their last node (a Mul) when their inner
nodes read only the subgraph and feed nothing else; the last node then takes the curvature
split of dconnx/ops/smooth.py (it is the shift and recentering point, the inner nodes get
no streams). Unrecognised, the same Mul is converted as a product of two data tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir import attrs
from .smooth import Curvature, _gelu_erf, _hardswish, _mish, silu, split_curvature


@dataclass
class Fusion:
    """An activation y = φ(x) that an exporter wrote as several nodes; `interior` are the nodes
    before the last one (they read nothing else and nothing else reads them)."""
    act: Curvature
    x: str
    interior: list

    def split(self, comp, node):
        split_curvature(comp, node, self.act, self.x, node.output[0])

    def backward(self, comp, node, rs, cts):
        return [(self.x, rs.smooth(cts[0], node, self.act, self.x))]


def _producer(view, name, op_type):
    node = view.producer.get(name)
    return node if node is not None and node.op_type == op_type else None


def _only_feeds(view, node, consumer) -> bool:
    return all(len(view.consumers.get(o, [])) == 1 and view.consumers[o][0] is consumer
               for o in node.output if o) and not any(o in view.output_names for o in node.output)


def _scalar(view, name, value, rtol=1e-6) -> bool:
    c = view.const(name)
    return c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - value) <= rtol * abs(value)


def _other(node, name):
    ins = list(node.input)
    return ins[1] if ins[0] == name else ins[0]


def _match_gate(view, node):
    """x·Sigmoid(x) (SiLU), x·Tanh(Softplus(x)) (Mish), x·HardSigmoid(x; 1/6, 1/2) (HardSwish)."""
    for k in (0, 1):
        gate, x = node.input[k], node.input[1 - k]
        s = _producer(view, gate, "Sigmoid")
        if s is not None and s.input[0] == x and _only_feeds(view, s, node):
            return Fusion(silu(), x, [s])
        t = _producer(view, gate, "Tanh")
        sp = _producer(view, t.input[0], "Softplus") if t is not None else None
        if sp is not None and sp.input[0] == x and _only_feeds(view, t, node) and _only_feeds(view, sp, t):
            return Fusion(_mish(node), x, [sp, t])
        h = _producer(view, gate, "HardSigmoid")
        if h is not None and h.input[0] == x and _only_feeds(view, h, node):
            a = attrs(h)
            if abs(float(a.get("alpha", 0.2)) - 1 / 6) < 1e-6 and abs(float(a.get("beta", 0.5)) - 0.5) < 1e-6:
                act = _hardswish(node)
                act.emit_phi = lambda b, u: b.mul(u, b.op("HardSigmoid", [u], alpha=1 / 6, beta=0.5))
                return Fusion(act, x, [h])
    return None


def _erf_half(view, name, x):
    """`name` = 1 + erf(x/s) (Add of 1 and Erf of Div(x, s) or Mul(x, 1/s), s = √2 to 1e-6):
    (its nodes, s as the graph holds it), or None."""
    add = _producer(view, name, "Add")
    if add is None:
        return None
    for k in (0, 1):
        erf = _producer(view, add.input[k], "Erf")
        if erf is None or not _scalar(view, add.input[1 - k], 1.0):
            continue
        scale = view.producer.get(erf.input[0])
        if scale is None or not _only_feeds(view, erf, add) or not _only_feeds(view, scale, erf):
            continue
        if scale.op_type == "Div" and scale.input[0] == x and _scalar(view, scale.input[1], math.sqrt(2.0)):
            return [scale, erf, add], _value(view, scale.input[1])
        if scale.op_type == "Mul" and x in scale.input and _scalar(view, _other(scale, x), 1 / math.sqrt(2.0)):
            return [scale, erf, add], 1.0 / _value(view, _other(scale, x))
    return None


def _value(view, name) -> float:
    return float(view.const(name).reshape(-1)[0])


def _match_gelu(view, node):
    """0.5·x·(1 + erf(x/√2)) as exported: (x·(1 + erf))·0.5 or (0.5·x)·(1 + erf) (any operand order)."""
    for k in (0, 1):
        inner = view.producer.get(node.input[k])
        other = node.input[1 - k]
        if inner is None or inner.op_type != "Mul" or not _only_feeds(view, inner, node):
            continue
        if _scalar(view, other, 0.5):                       # (x · (1 + erf)) · 0.5
            for j in (0, 1):
                x, e = inner.input[j], inner.input[1 - j]
                found = _erf_half(view, e, x)
                if found is not None and _only_feeds(view, found[0][-1], inner):
                    return Fusion(_gelu_erf(found[1]), x, found[0] + [inner])
        for j in (0, 1):                                    # (0.5 · x) · (1 + erf)
            if _scalar(view, inner.input[1 - j], 0.5):
                x = inner.input[j]
                found = _erf_half(view, other, x)
                if found is not None and _only_feeds(view, found[0][-1], node):
                    return Fusion(_gelu_erf(found[1]), x, found[0] + [inner])
    return None


def find_fusions(view) -> dict:
    """{last node's key: Fusion} for every exported activation subgraph of the graph."""
    found = {}
    for node in view.model.graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        fusion = _match_gate(view, node) or _match_gelu(view, node)
        if fusion is not None and view.is_data(fusion.x):
            found[node.name or node.output[0]] = fusion
    return found


def fused_interior(fusions: dict) -> set:
    return {n.name or n.output[0] for f in fusions.values() for n in f.interior}
