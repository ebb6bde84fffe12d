"""Ops that are refused, each with the reason (never approximated).

An op that is neither declared here nor anywhere else in dconnx/ops is
refused too ("no DC rule for this op"). To support one of these, remove it
here and declare its spec in its family module.
"""
from __future__ import annotations

from .registry import refuse

_SMOOTH = "smooth nonlinearity: no exact DC split with these rules (never approximated)"
for _op in ("Sigmoid", "Tanh", "Softplus", "Elu", "Selu", "Celu", "Gelu"):
    refuse(_op, _SMOOTH)
refuse("Erf", "smooth nonlinearity (GELU): no exact DC split (never approximated)")
refuse("HardSigmoid", "gated nonlinearity: not supported")
refuse("HardSwish", "product of data tensors (x * hardsigmoid(x)): not DC-splittable by these rules")
refuse("Mish", "smooth nonlinearity: no exact DC split (never approximated)")
refuse("Exp", "smooth nonlinearity: not supported")
refuse("Log", "smooth nonlinearity: not supported")
refuse("Sqrt", "smooth nonlinearity: not supported", shape_op=True)
refuse("Pow", "nonlinear: not supported")
refuse("Reciprocal", "nonlinear: not supported")
for _op in ("LRN", "InstanceNormalization", "LayerNormalization", "GroupNormalization"):
    refuse(_op, "data-dependent normalization: not supported")
refuse("ArgMax", "integer output of data: not differentiable")
refuse("TopK", "data-dependent selection: not supported")
for _op in ("Loop", "If", "Scan"):
    refuse(_op, "control flow: not supported")
refuse("Einsum", "general tensor contraction: not supported")
refuse("Where", "data-dependent selection: not supported", shape_op=True)
refuse("Attention", "product of data tensors: not DC-splittable by these rules")
