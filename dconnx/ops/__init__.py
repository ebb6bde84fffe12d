"""The op rule registry.

For every ONNX op of the canonical graph, a split rule (forward streams) and a
backward rule (what flows back, delegated to the active rule set) are
registered side by side in the op's family module. Registering an op twice is
an error. `SUPPORTED` describes each op for `dconnx ops`; `UNSUPPORTED` gives
the reason for ops that are refused, and `CANONICALIZED` the rewrite for ops
that exist only before canonicalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SPLIT_RULES: dict[str, Callable] = {}
BACKWARD_RULES: dict[str, Callable] = {}


@dataclass(frozen=True)
class OpInfo:
    op_type: str
    family: str
    shift: bool        # α-shift point (backward)
    recenter: bool     # recentering point (forward)
    doc: str


SUPPORTED: dict[str, OpInfo] = {}
LINEAR_MAPS: dict[str, Callable] = {}   # op type -> factory(comp, node) -> LinearMap (deflinear ops)


class RegistryError(RuntimeError):
    """A programming error in the rule tables (not a user error)."""


def _register(table: dict, op_type: str, fn: Callable, what: str) -> None:
    if op_type in table:
        raise RegistryError(f"a {what} rule for {op_type} is already registered "
                            f"({table[op_type].__module__}.{table[op_type].__name__})")
    table[op_type] = fn


def split_rule(op_type: str):
    def deco(fn):
        _register(SPLIT_RULES, op_type, fn, "split")
        return fn
    return deco


def backward_rule(op_type: str):
    def deco(fn):
        _register(BACKWARD_RULES, op_type, fn, "backward")
        return fn
    return deco


def describe(op_type: str, family: str, *, shift: bool, recenter: bool, doc: str) -> None:
    if op_type in SUPPORTED:
        raise RegistryError(f"{op_type} is already described")
    SUPPORTED[op_type] = OpInfo(op_type, family, shift, recenter, doc)


# Ops that canonicalization rewrites away (name -> what it becomes).
CANONICALIZED: dict[str, str] = {
    "Identity": "removed",
    "Dropout": "removed (inference)",
    "Flatten": "Reshape",
    "Clip": "Relu(x - a) - Relu(x - b) + a (exact)",
    "LeakyRelu": "s*x + (1 - s)*Relu(x) (exact)",
    "PRelu": "s*x + (1 - s)*Relu(x) with constant slope (exact)",
    "Max": "Relu(x) when one operand is the constant 0",
    "Softmax": "kept for the original output; the maps explain its input (logits)",
    "LogSoftmax": "kept for the original output; the maps explain its input (logits)",
    "Div": "Mul by the reciprocal constant",
    "Constant": "folded into initializers",
    "Shape": "folded where the shape is static (integer subgraphs are never split)",
}

# Ops refused with a reason. Anything neither supported nor listed is refused too.
UNSUPPORTED: dict[str, str] = {
    "Sigmoid": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Tanh": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Softplus": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Elu": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Selu": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Celu": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Gelu": "smooth nonlinearity: no exact DC split with these rules (never approximated)",
    "Erf": "smooth nonlinearity (GELU): no exact DC split (never approximated)",
    "HardSigmoid": "gated nonlinearity: not supported",
    "HardSwish": "product of data tensors (x * hardsigmoid(x)): not DC-splittable by these rules",
    "Mish": "smooth nonlinearity: no exact DC split (never approximated)",
    "Exp": "smooth nonlinearity: not supported",
    "Log": "smooth nonlinearity: not supported",
    "Sqrt": "smooth nonlinearity: not supported",
    "Pow": "nonlinear: not supported",
    "Reciprocal": "nonlinear: not supported",
    "LRN": "data-dependent normalization: not supported",
    "InstanceNormalization": "data-dependent normalization: not supported",
    "LayerNormalization": "data-dependent normalization: not supported",
    "GroupNormalization": "data-dependent normalization: not supported",
    "Resize": "resampling is not supported yet",
    "Upsample": "resampling is not supported yet",
    "ReduceMax": "max over an axis: not supported (use MaxPool)",
    "ArgMax": "integer output of data: not differentiable",
    "TopK": "data-dependent selection: not supported",
    "Loop": "control flow: not supported",
    "If": "control flow: not supported",
    "Scan": "control flow: not supported",
    "Einsum": "general tensor contraction: not supported",
    "Where": "data-dependent selection: not supported",
    "Attention": "product of data tensors: not DC-splittable by these rules",
}


def _load_families() -> None:
    from . import activation, elementwise, linear, normalization, pooling, shape  # noqa: F401


_load_families()
