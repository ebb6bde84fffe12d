"""Ops that are refused, each with the reason (never approximated).

An op that is neither declared here nor anywhere else in dconnx/ops is
refused too ("no DC rule for this op"). To support one of these, remove it
here and declare its spec in its family module.
"""
from __future__ import annotations

from .registry import refuse

refuse("Erf", "smooth nonlinearity: supported only as the Gelu op (the erf form of GELU is not recognised yet)")
_UNBOUNDED = "nonlinearity with unbounded slope: no exact DC split with bounded-slope rules (never approximated)"
refuse("Exp", _UNBOUNDED)
refuse("Log", _UNBOUNDED)
refuse("Sqrt", _UNBOUNDED, shape_op=True)
refuse("Pow", _UNBOUNDED)
refuse("Reciprocal", _UNBOUNDED)
for _op in ("LRN", "InstanceNormalization", "LayerNormalization", "GroupNormalization"):
    refuse(_op, "data-dependent normalization: not supported")
refuse("ArgMax", "integer output of data: not differentiable")
refuse("TopK", "data-dependent selection: not supported")
for _op in ("Loop", "If", "Scan"):
    refuse(_op, "control flow: not supported")
refuse("Einsum", "general tensor contraction: not supported")
refuse("Where", "data-dependent selection: not supported", shape_op=True)
refuse("Attention", "product of data tensors: not DC-splittable by these rules")
