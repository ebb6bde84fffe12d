"""The op registry proper: `OpSpec`, the specs, the tables derived from them and the
builders the family modules declare their ops with (re-exported by `dconnx.ops`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

TWO_DATA = "two-data"     # a shift/recentering point only when both operands are data tensors


@dataclass
class OpSpec:
    op_type: str
    family: str = ""
    doc: str = ""
    # rules (supported ops): forward streams, backward cotangents, linear map factory
    split: Callable | None = None          # (comp, node) -> None
    backward: Callable | None = None       # (comp, node, rs, cts) -> [(input, cotangent)]
    linear_map: Callable | None = None     # (comp, node) -> LinearMap (ops linear in one data input)
    # facts the passes ask
    shift: bool | str = False              # α-shift point of the backward walk (or TWO_DATA)
    recenter: bool | str = False           # recentering point of the forward split (or TWO_DATA)
    keeps_sign: bool = False               # a nonnegative data input gives a nonnegative output (LRP)
    zero_n: bool = False                   # zero n-streams in give zero n-streams out (split)
    shape_op: bool = False                 # may appear in integer shape arithmetic (never split)
    metadata_only: bool = False            # reads only its data input's shape (Shape, Size)
    explains_input: bool = False           # kept for the model's output; the maps explain its input
    weights: bool = False                  # a layer with trainable constant weights
    const_operands: bool = False           # a constant operand is a parameter of the layer
    auto_pad: bool = False                 # has an auto_pad attribute that canonicalize makes explicit
    window_pool: bool = False              # a 1×1, stride-1, unpadded window is the identity
    absorbs_batchnorm: bool = False        # a following BatchNormalization folds into it
    # preflight: (view, node, data_inputs, final) -> reason or None
    check: Callable | None = None
    # ops that exist only before canonicalization: what they become and the rewrite that does it
    becomes: str | None = None
    rewrite: str | None = None
    # ops that are refused, with the reason
    refused: str | None = None
    described: bool = field(default=False, repr=False)

    @property
    def supported(self) -> bool:
        return self.split is not None and self.backward is not None

    @property
    def kind(self) -> str:
        if self.refused is not None:
            return "refused"
        if self.supported:
            return "supported"
        if self.becomes is not None:
            return "canonicalized"
        return "shape-only" if self.shape_op else "incomplete"

    def problems(self) -> list[str]:
        """What makes this spec incomplete or contradictory (empty when it is whole)."""
        out = []
        if (self.split is None) != (self.backward is None):
            out.append("has a split rule but no backward rule" if self.split else
                       "has a backward rule but no split rule")
        if self.supported and not (self.family and self.doc):
            out.append("is supported but has no family/doc")
        if self.linear_map is not None and not self.supported:
            out.append("has a linear map but no rules")
        if self.refused is not None and (self.supported or self.becomes):
            out.append("is refused but also has rules or a rewrite")
        if self.refused is not None and not self.refused:
            out.append("is refused without a reason")
        if self.becomes is not None and not self.rewrite:
            out.append("is rewritten by canonicalization but names no rewrite")
        for name in ("shift", "recenter"):
            if getattr(self, name) not in (True, False, TWO_DATA):
                out.append(f"{name}={getattr(self, name)!r} is not True, False or {TWO_DATA!r}")
        if not self.supported and (self.shift or self.recenter or self.zero_n or self.keeps_sign):
            out.append("states stream facts but has no rules")
        if self.kind == "incomplete":
            out.append("is neither supported, canonicalized, refused nor a shape op")
        return out


class RegistryError(RuntimeError):
    """A programming error in the rule tables (not a user error)."""


SPECS: dict[str, OpSpec] = {}

# derived tables (kept in step with SPECS by _derive)
SPLIT_RULES: dict[str, Callable] = {}
BACKWARD_RULES: dict[str, Callable] = {}
SUPPORTED: dict[str, OpSpec] = {}
LINEAR_MAPS: dict[str, Callable] = {}   # op type -> factory(comp, node) -> LinearMap
CANONICALIZED: dict[str, str] = {}      # op type -> what canonicalization makes of it
UNSUPPORTED: dict[str, str] = {}        # op type -> why it is refused
KEEPS_SIGN: set[str] = set()
ZERO_N_PRESERVING: set[str] = set()
SHAPE_OPS: set[str] = set()
METADATA_ONLY: set[str] = set()
EXPLAINS_INPUT: set[str] = set()
WEIGHT_OPS: set[str] = set()
CONST_OPERAND_OPS: set[str] = set()
AUTO_PAD_OPS: set[str] = set()
WINDOW_POOLS: set[str] = set()
ABSORBS_BATCHNORM: set[str] = set()

# ops that are never constant-folded (they draw random numbers)
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli"})
# ops that onnxruntime's CPU provider lacks in float16 (ScatterElements with reduction "add"):
# they run in float32 between Casts in a float16 graph
FLOAT16_MISSING = ("ScatterElements",)

_FACT_SETS = {"keeps_sign": KEEPS_SIGN, "zero_n": ZERO_N_PRESERVING, "shape_op": SHAPE_OPS,
              "metadata_only": METADATA_ONLY, "explains_input": EXPLAINS_INPUT, "weights": WEIGHT_OPS,
              "const_operands": CONST_OPERAND_OPS, "auto_pad": AUTO_PAD_OPS,
              "window_pool": WINDOW_POOLS, "absorbs_batchnorm": ABSORBS_BATCHNORM}


def _derive() -> None:
    tables = (SPLIT_RULES, BACKWARD_RULES, SUPPORTED, LINEAR_MAPS, CANONICALIZED, UNSUPPORTED,
              *_FACT_SETS.values())
    for t in tables:
        t.clear()
    for op, s in SPECS.items():
        if s.split is not None:
            SPLIT_RULES[op] = s.split
        if s.backward is not None:
            BACKWARD_RULES[op] = s.backward
        if s.supported:
            SUPPORTED[op] = s
        if s.linear_map is not None:
            LINEAR_MAPS[op] = s.linear_map
        if s.becomes is not None:
            CANONICALIZED[op] = s.becomes
        if s.refused is not None:
            UNSUPPORTED[op] = s.refused
        for fact, table in _FACT_SETS.items():
            if getattr(s, fact):
                table.add(op)


def spec(op_type: str) -> OpSpec | None:
    return SPECS.get(op_type)


def rewritten_by(rewrite: str) -> frozenset[str]:
    """The op types the named canonicalization rewrite removes."""
    return frozenset(op for op, s in SPECS.items() if s.rewrite == rewrite)


def op_spec(s: OpSpec) -> OpSpec:
    """Register a whole spec (the usual form in a family module)."""
    old = SPECS.get(s.op_type)
    if old is not None:
        if old.described or old.supported or old.refused is not None:
            raise RegistryError(f"{s.op_type} is already declared ({old.family or 'no family'})")
        # a shape op or a rewrite declared so far: the new declaration keeps those facts
        for k in ("shape_op", "metadata_only", "becomes", "rewrite", "check"):
            if getattr(s, k) in (None, False):
                setattr(s, k, getattr(old, k))
    s.described = s.described or s.supported or bool(s.doc)
    SPECS[s.op_type] = s
    _derive()
    return s


def refuse(op_type: str, reason: str, **facts) -> OpSpec:
    return op_spec(OpSpec(op_type, family="refused", refused=reason, **facts))


def canonical_rewrite(op_type: str, family: str, becomes: str, rewrite: str, **facts) -> OpSpec:
    return op_spec(OpSpec(op_type, family=family, becomes=becomes, rewrite=rewrite, **facts))


# -- builders for ops declared in pieces (describe + split_rule + backward_rule) --------------
def _pending(op_type: str) -> OpSpec:
    s = SPECS.get(op_type)
    if s is None:
        s = SPECS[op_type] = OpSpec(op_type)
    elif s.refused is not None:
        raise RegistryError(f"{op_type} is declared refused ({s.refused!r}); remove that declaration "
                            "to give it rules")
    return s


def _set_rule(op_type: str, attr: str, fn: Callable, what: str) -> None:
    s = _pending(op_type)
    old = getattr(s, attr)
    if old is not None:
        raise RegistryError(f"a {what} rule for {op_type} is already registered "
                            f"({old.__module__}.{old.__name__})")
    setattr(s, attr, fn)
    _derive()


def split_rule(op_type: str):
    def deco(fn):
        _set_rule(op_type, "split", fn, "split")
        return fn
    return deco


def backward_rule(op_type: str):
    def deco(fn):
        _set_rule(op_type, "backward", fn, "backward")
        return fn
    return deco


def describe(op_type: str, family: str, *, shift, recenter, doc: str, **facts) -> OpSpec:
    """Family, α-shift/recentering facts and doc of a supported op (other facts as keywords).
    An op that so far exists only as a shape op or a canonicalization rewrite gains the rules."""
    s = _pending(op_type)
    if s.described:
        raise RegistryError(f"{op_type} is already described")
    s.family, s.shift, s.recenter, s.doc, s.described = family, shift, recenter, doc, True
    for k, v in facts.items():
        if not hasattr(s, k) or k in ("op_type", "split", "backward", "described"):
            raise RegistryError(f"{op_type}: unknown op fact '{k}'")
        setattr(s, k, v)
    _derive()
    return s


def facts(op_type: str, **values) -> OpSpec:
    """Add facts (shape_op, check, rewrite, …) to an op's spec, creating the spec if needed."""
    s = _pending(op_type)
    for k, v in values.items():
        if not hasattr(s, k) or k in ("op_type", "described"):
            raise RegistryError(f"{op_type}: unknown op fact '{k}'")
        setattr(s, k, v)
    _derive()
    return s


def incomplete_specs() -> dict[str, list[str]]:
    return {op: p for op, s in SPECS.items() if (p := s.problems())}
