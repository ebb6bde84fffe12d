"""The op registry: one `OpSpec` per ONNX op type.

Each op's spec is declared next to its rules in its family module
(`dconnx/ops/<family>.py`) and says everything the compiler knows about the
op: its split rule (forward streams) and backward rule (what flows back,
delegated to the active rule set), its linear map where it is linear in its
one data input, the facts the passes ask (α-shift point, recentering point,
keeps a nonnegative tensor nonnegative, preserves a zero n-stream, may appear
in integer shape arithmetic, …), its preflight check (attribute validation
returning a reason, or None), what canonicalization rewrites it into, or why
it is refused. Declaring an op twice is an error.

Every table the passes read is derived from the specs (`SPLIT_RULES`,
`BACKWARD_RULES`, `SUPPORTED`, `LINEAR_MAPS`, `CANONICALIZED`, `UNSUPPORTED`
and the fact sets below), and `dconnx ops` prints them. `describe`,
`split_rule`, `backward_rule` (and `base.deflinear`) are thin builders of
specs for family modules that declare an op in pieces. The machinery lives in
`dconnx.ops.registry` (the family modules import it from there, so that the
package, which loads the families, and the families form no import circle).
"""
from __future__ import annotations

from .registry import (  # noqa: F401
    TWO_DATA, OpSpec, RegistryError, SPECS, SPLIT_RULES, BACKWARD_RULES, SUPPORTED, LINEAR_MAPS,
    CANONICALIZED, UNSUPPORTED, KEEPS_SIGN, ZERO_N_PRESERVING, SHAPE_OPS, METADATA_ONLY,
    EXPLAINS_INPUT, WEIGHT_OPS, CONST_OPERAND_OPS, AUTO_PAD_OPS, WINDOW_POOLS, ABSORBS_BATCHNORM,
    NONDETERMINISTIC, FLOAT16_MISSING, spec, rewritten_by, op_spec, refuse, canonical_rewrite,
    split_rule, backward_rule, describe, facts, incomplete_specs,
)


def _load_families() -> None:
    from . import activation, elementwise, linear, normalization, pooling, shape, refused  # noqa: F401
    from . import shape_arith  # noqa: F401
    from . import resample, selection  # noqa: F401
    from . import smooth  # noqa: F401


_load_families()
