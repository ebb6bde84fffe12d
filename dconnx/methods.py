"""The attribution methods: each is a rule set (what flows back) plus a head (how the
cotangent and the forward values at the chosen layer become a [batch, h, w] map).

A method is data: registering one here is all it takes for `--methods`, the
`Explainer` and `dconnx methods` to know it. Rule sets are built once per
conversion and shared by every method that names them (one walk, one forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import OptionError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    ruleset: str                           # key in RULESETS
    head: Callable                         # (comp, tensor, ruleset, cotangent) -> [B, C, ...] or [B, ...]
    reduce: str = "sum"                    # how channels are combined: "sum" | "none" (head already did)
    params: dict = field(default_factory=dict)   # option name -> what it means (documented)
    matches: str = ""                      # the reference library/definition it equals
    signed: bool = True                    # False: maps are nonnegative by construction (CAMs)


METHODS: dict[str, Method] = {}
RULESETS: dict[str, Callable] = {}         # name -> factory(comp) -> RuleSet


def register_method(m: Method) -> Method:
    if m.name in METHODS:
        raise RuntimeError(f"method {m.name} registered twice")
    METHODS[m.name] = m
    return m


def register_ruleset(name: str, factory: Callable) -> None:
    if name in RULESETS:
        raise RuntimeError(f"rule set {name} registered twice")
    RULESETS[name] = factory


def parse_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = methods.split(",")
    out = []
    for m in methods:
        m = m.strip().lower()
        if not m:
            continue
        if m not in METHODS:
            raise OptionError(f"unknown method '{m}'; known: {', '.join(METHODS)}")
        if m not in out:
            out.append(m)
    return tuple(out)


# -- the split methods -----------------------------------------------------
def _split_ruleset(comp):
    from .rulesets import SplitSensitivities
    layout = "grad" if comp.opts.relu_backward == "standard" and not comp.opts.expose else "full"
    return SplitSensitivities(comp, layout)


def _splitlrp_ruleset(comp):
    from .rulesets import SplitLRP
    return SplitLRP(comp)


def _splitgrad_head(comp, tensor, rs, ct):
    return rs.splitgrad_sens(ct)


def _splitcam_head(comp, tensor, rs, ct):
    b = comp.b
    weighted = b.mul(b.relu(rs.splitgrad_sens(ct)), comp.stream_sum(tensor))
    axis = comp.channel_axis_of(tensor)
    return b.relu(b.reduce_sum(weighted, [axis], keepdims=0), hint="dc/splitcam_sum")


def _splitlrp_head(comp, tensor, rs, ct):
    return rs.map_at(ct, like=tensor)


register_ruleset("split", _split_ruleset)
register_ruleset("splitlrp", _splitlrp_ruleset)

_SPLIT_PARAMS = {"alpha": "graph input, default 0.35 (0..0.5)", "relu_backward": "standard | sum | mask_diff",
                 "maxpool": "wta | dc", "stabilize": "recenter | none", "ties": "strict | geq"}
register_method(Method(
    "splitgrad", "Σ_c (δpp + δnn): the stabilized split-stream sensitivities", "split", _splitgrad_head,
    params=_SPLIT_PARAMS, matches="float64 reference from the method (tests/reference); ½·Σ_c ∇f at α = 0.5"))
register_method(Method(
    "splitcam", "ReLU(Σ_c ReLU(δpp + δnn) ⊙ (p + n)): LayerCAM on the split streams", "split",
    _splitcam_head, reduce="none", params=_SPLIT_PARAMS, signed=False,
    matches="float64 reference; ½·LayerCAM at α = 0.5 after a Relu under recentering"))
register_method(Method(
    "splitlrp", "ε-LRP through the stream graph: g-relevance minus h-relevance", "splitlrp",
    _splitlrp_head, params={"lrp_epsilon": "default 1e-6", "maxpool": "wta | dc",
                            "stabilize": "recenter | none"},
    matches="float64 reference; conserves g_k − h_k up to bias and ε shares"))

from . import methods_baselines  # noqa: E402,F401  (Gradient, GradCAM, Guided BP, LRP baselines)
