"""Preflight checks shared by several op specs.

A check is `check(view, node, data_in, final) -> reason | None`: `data_in` are
the node's data-dependent inputs; before canonicalization (`final=False`)
constants computed by foldable subgraphs are not known yet, so checks that
need them wait for `final`.
"""
from __future__ import annotations

import numpy as np

from ..ir import attrs

PRODUCT = "product of two data-dependent tensors is not DC-splittable by these rules"


def all_of(*checks):
    """A check that runs `checks` in order and returns the first reason."""
    def check(view, node, data_in, final):
        for c in checks:
            why = c(view, node, data_in, final)
            if why:
                return why
        return None
    return check


def one_data_operand(view, node, data_in, final):
    return PRODUCT if len(data_in) > 1 else None


def constant_parameters(view, node, data_in, final):
    for i in node.input[1:]:
        if i and not view.is_const(i) and i not in view.data_tensors and not _foldable(view, i):
            return f"parameter '{i}' is not a constant"
    return None


def _foldable(view, name: str) -> bool:
    return name not in view.data_tensors


def constant_broadcasts_to_data(view, node, data_in, final):
    """An elementwise op with one data operand: the constant must broadcast to the data's shape."""
    if len(data_in) == 1 and broadcasts_up(view.shape(data_in[0]), view.shape(node.output[0])):
        return (f"the constant operand broadcasts the data tensor up from {view.shape(data_in[0])} "
                f"to {view.shape(node.output[0])} (only constants that broadcast to the data's "
                "shape are supported)")
    return None


def broadcasts_up(s_in, s_out) -> bool:
    """Whether an elementwise op's output is bigger than its data operand: a higher rank, or an
    axis that is known on both sides and larger (symbolic dims, e.g. behind a Pad with computed
    pads before canonicalization, are compared on the canonical graph, where they are static)."""
    if s_in is None or s_out is None:
        return False
    if len(s_out) > len(s_in):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and b > a for a, b in zip(s_in, s_out))


def same_shape_data(view, node, data_in, final):
    """Two data operands must have one shape. Only what is known is compared: two dims that are
    both integers and differ, or a different rank. Symbolic names are never compared (shape
    inference gives the batch axis behind a Reshape to [-1, …] a new name, 'unk__0', though it
    is the same batch)."""
    if len(data_in) != 2:
        return None
    s0, s1 = view.shape(node.input[0]), view.shape(node.input[1])
    if s0 is None or s1 is None:
        return None
    if len(s0) != len(s1) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                 for a, b in zip(s0, s1)):
        return f"broadcasting between data tensors ({s0} vs {s1}) is not supported"
    return None


def reduce_axes_not_batch(view, node, data_in, final):
    axes = view.reduce_axes(node)
    if axes is None and final:
        return "the reduced axes are not constant"
    if axes is not None and (not axes or 0 in axes):
        return "reduces over the batch axis"
    return None


def not_along_batch(view, node, data_in, final):
    if int(attrs(node).get("axis", 0)) == 0:
        return "operates along the batch axis"
    return None


def last_op_only(view, node, data_in, final):
    outs = set(view.output_names)
    if not any(o in outs for o in node.output):
        return "Softmax is only supported as the last op (the maps explain its input)"
    return None
