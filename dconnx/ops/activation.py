"""Relu and the activations canonicalization rewrites into it.

Relu in "max" mode: relu(a − b) = max(a, b) − b, so (P, N) → (max(P, N), N).
Clip, LeakyRelu, PRelu and Max(x, 0) become Relu exactly; Softmax/LogSoftmax
stay for the model's output and the maps explain their input (the logits).
"""
from __future__ import annotations

from ..ir import attrs
from .registry import OpSpec, canonical_rewrite, op_spec
from .base import set_streams
from .checks import all_of, constant_parameters, last_op_only, one_data_operand


def split_relu(comp, node):
    sp = comp.stream(node.input[0])
    y = node.output[0]
    P = comp.b.op("Max", [sp.p, sp.n], hint=f"{y}::P")
    set_streams(comp, y, P, sp.n, recenter=True, nonneg=True)
    if comp.opts.stabilize == "recenter":
        comp.zero_streams.add(comp.stream(y).n)     # max(P, N) ≥ N: nothing is left on n


def clip_piece(view, node) -> bool:
    """True when Relu `node` is one of the two pieces of a canonical Clip block (clip_to_relu):
    Relu(x − lo) − Relu(x − hi) with lo < hi constants (no Sub where a bound is 0), the piece read
    by that Sub only. Rule sets that treat ReLU6/Hardtanh as one module (Captum's guided backprop
    hooks nn.ReLU only) recognize their pieces by it."""
    def base(t):
        n = view.producer.get(t)
        if n is not None and n.op_type == "Sub" and view.is_const(n.input[1]) and not view.is_const(n.input[0]):
            c = view.const(n.input[1])
            if c.size == 1:
                return n.input[0], float(c.reshape(()))
        return t, 0.0
    users = view.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Sub" or node.output[0] in view.output_names:
        return False
    lo, hi = (view.producer.get(t) for t in users[0].input)
    if lo is None or hi is None or lo.op_type != "Relu" or hi.op_type != "Relu" or lo is hi:
        return False
    (x_lo, c_lo), (x_hi, c_hi) = base(lo.input[0]), base(hi.input[0])
    return x_lo == x_hi and c_hi > c_lo


def backward_relu(comp, node, rs, cts):
    return [(node.input[0], rs.relu(cts[0], node))]


op_spec(OpSpec("Relu", "activation", split=split_relu, backward=backward_relu, shift=True, recenter=True,
               doc="max mode (max(P, N), N); backward modes standard / sum / mask_diff; "
                   "Clip, ReLU6, LeakyRelu, PRelu and Max(x, 0) are rewritten to it exactly"))


def _check_clip(view, node, data_in, final):
    for i in node.input[1:]:
        if i and view.is_data(i):
            return "clip bounds depend on the data"
    return None


def _check_leaky(view, node, data_in, final):
    if not (0.0 <= float(attrs(node).get("alpha", 0.01)) < 1.0):
        return "LeakyRelu slope must be in [0, 1)"
    return None


canonical_rewrite("Clip", "activation", "Relu(x - a) - Relu(x - b) + a (exact)", "clip_to_relu",
                  check=_check_clip)
canonical_rewrite("LeakyRelu", "activation", "s*x + (1 - s)*Relu(x) (exact)", "leaky_to_relu",
                  check=_check_leaky)
canonical_rewrite("PRelu", "activation", "s*x + (1 - s)*Relu(x) with constant slope (exact)",
                  "leaky_to_relu", const_operands=True,
                  check=all_of(one_data_operand, constant_parameters))
for _op in ("Softmax", "LogSoftmax"):
    canonical_rewrite(_op, "activation", "kept for the original output; the maps explain its input (logits)",
                      "strip_softmax", explains_input=True, check=last_op_only)
