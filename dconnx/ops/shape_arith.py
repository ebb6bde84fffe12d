"""Ops that appear in integer shape arithmetic (on Shape outputs and constants).

They are folded or left alone and never split; on float data they are
refused unless a family module declares rules for them.
"""
from __future__ import annotations

from .registry import SPECS, facts

for _op in ("Gather", "Cast", "ConstantOfShape", "Range", "Equal", "Expand", "ReduceProd",
            "Floor", "Ceil", "Tile", "Not", "Greater", "Less", "GatherElements", "Size"):
    s = facts(_op, shape_op=True)
    if not s.family:
        s.family = "shape arithmetic"
facts("Size", metadata_only=True)
assert all(SPECS[op].shape_op for op in ("Shape", "Concat", "Reshape", "Where"))
