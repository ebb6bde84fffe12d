"""Relu in "max" mode: relu(a − b) = max(a, b) − b, so (P, N) → (max(P, N), N)."""
from __future__ import annotations

from . import backward_rule, describe, split_rule
from .base import set_streams

describe("Relu", "activation", shift=True, recenter=True,
         doc="max mode (max(P, N), N); backward modes standard / sum / mask_diff; "
             "Clip, ReLU6, LeakyRelu, PRelu and Max(x, 0) are rewritten to it exactly")


@split_rule("Relu")
def split_relu(comp, node):
    sp = comp.stream(node.input[0])
    y = node.output[0]
    P = comp.b.op("Max", [sp.p, sp.n], hint=f"{y}::P")
    set_streams(comp, y, P, sp.n, recenter=True, nonneg=True)
    if comp.opts.stabilize == "recenter":
        comp.zero_streams.add(comp.stream(y).n)     # max(P, N) ≥ N: nothing is left on n


@backward_rule("Relu")
def backward_relu(comp, node, rs, cts):
    return [(node.input[0], rs.relu(cts[0], node))]
