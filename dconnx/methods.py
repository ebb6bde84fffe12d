"""The attribution methods: each is a rule set (what flows back) plus a head (how the
cotangent and the forward values at the chosen layer become a [batch, h, w] map).

A method is data: registering one (dconnx/method_registry.py) is all it takes for
`--methods`, the `Explainer` and `dconnx methods` to know it. Rule sets are built once per
conversion and shared by every method that names them (one walk, one forward).
"""
from __future__ import annotations

from .method_registry import (METHODS, RULESETS, Method, parse_methods,  # noqa: F401
                              register_method, register_ruleset)


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

from . import methods_baselines  # noqa: E402,F401  (Gradient, GradCAM, Guided BP, LRP, DeepLIFT, IG)
