"""Smooth and kinked activations by the curvature split (docs/method.md, "Beyond ReLU").

Every activation φ here has bounded slopes and one interval [lo, hi] on which it
is convex (lo may be −∞, hi +∞); outside it φ is concave. Then

    φ₁(u) = φ(clip(u, lo, hi)) + s_hi·relu(u − hi) − s_lo·relu(lo − u)

(φ on the convex interval, continued with the tangent's slope across the concave
sides) is convex, and so is φ₂ = φ₁ − φ. Each part q ∈ {φ₁, φ₂} with slopes in
[m, M] is written q(u) = m·u + Ψ(u), Ψ nondecreasing and bounded below by
c₀ = lim_{u→−∞} Ψ(u); the convex rule gives streams

    P_q = m⁺P + m⁻N + (Ψ(x) − c₀) + (M − m)N + c₀⁺,   N_q = m⁺N + m⁻P + (M − m)N + c₀⁻,

nonnegative, convex and nondecreasing in (P, N), with P_q − N_q = q(x). The
activation's streams are P' = P₁ + N₂ and N' = N₁ + P₂, so P' − N' = φ(x) exactly.
The interval ends are the inflection points: the roots of the closed-form second
derivative, found by bisection to machine precision (never a fitted curve).

Backward (the Jacobian of the stream map, transposed): both pair sums are multiplied
by the constant c = Σ_q |m| + M − m, and the pair differences by φ'(x) plus a
coupling (φ₁' + φ₂' − M₁ − M₂)·(pair sum) that cancels between g and h; so the
σ structure of the Relu carries over: σ ← c·σ, ∇f ← φ'(x)·∇f.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..ir import attrs
from .registry import OpSpec, canonical_rewrite, op_spec
from .base import set_streams
from .rewrite import NodeWriter

INF = math.inf


def _bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    """The root of f in [lo, hi] (f changes sign there), to machine precision."""
    flo = f(lo)
    if flo == 0.0:
        return lo
    if (flo > 0) == (f(hi) > 0):
        raise ValueError("no sign change")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if (f(mid) > 0) == (flo > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sig(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u))


def _softplus(u: float) -> float:
    return max(u, 0.0) + math.log1p(math.exp(-abs(u)))


_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


@dataclass
class Curvature:
    """One activation φ (elementwise, parameters fixed by the node's attributes)."""
    name: str
    phi: Callable[[float], float]            # float64, for the constants
    dphi: Callable[[float], float]           # φ' (one-sided limits at the interval ends)
    emit_phi: Callable                       # (b, x) -> tensor name: φ(x) in the graph
    emit_dphi: Callable                      # (b, x) -> tensor name: φ'(x) in the graph
    lo: float                                # convex on [lo, hi]
    hi: float
    slope_minus_inf: float                   # φ'(−∞)
    slope_plus_inf: float                    # φ'(+∞)
    limit_minus_inf: float                   # L = lim_{u→−∞} φ(u) − φ'(−∞)·u
    s_lo: float = field(init=False)
    s_hi: float = field(init=False)

    def __post_init__(self):
        self.s_lo = self.slope_minus_inf if self.lo == -INF else self.dphi(self.lo)
        self.s_hi = self.slope_plus_inf if self.hi == INF else self.dphi(self.hi)

    # -- the two convex parts: (m, M, c0) each -------------------------------
    def parts(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        if self.lo == -INF:
            m1, c01 = self.slope_minus_inf, self.limit_minus_inf
            m2, c02 = 0.0, 0.0
        else:
            m1 = self.s_lo
            c01 = self.phi(self.lo) - self.s_lo * self.lo
            m2 = self.s_lo - self.slope_minus_inf
            c02 = c01 - self.limit_minus_inf
        M1 = self.s_hi
        M2 = 0.0 if self.hi == INF else self.s_hi - self.slope_plus_inf
        return (m1, M1, c01), (m2, M2, c02)

    def pair_gain(self) -> float:
        """c: the factor both pair sums of sensitivities are multiplied by."""
        return sum(abs(m) + M - m for m, M, _ in self.parts())

    def phi1(self, b, x: str) -> str:
        lo, hi = self.lo, self.hi
        if lo == -INF and hi == INF:
            return self.emit_phi(b, x)
        xc = b.op("Clip", [x, b.scalar(lo) if lo != -INF else "", b.scalar(hi) if hi != INF else ""])
        out = self.emit_phi(b, xc)
        if hi != INF and self.s_hi != 0.0:
            out = b.add(out, b.mul(b.relu(b.sub(x, b.scalar(hi))), b.scalar(self.s_hi)))
        if lo != -INF and self.s_lo != 0.0:
            out = b.sub(out, b.mul(b.relu(b.sub(b.scalar(lo), x)), b.scalar(self.s_lo)))
        return out

    def dphi1(self, b, x: str) -> str:
        """φ₁'(x) = φ'(clip(x, lo, hi))."""
        if self.lo == -INF and self.hi == INF:
            return self.emit_dphi(b, x)
        xc = b.op("Clip", [x, b.scalar(self.lo) if self.lo != -INF else "",
                           b.scalar(self.hi) if self.hi != INF else ""])
        return self.emit_dphi(b, xc)


def _pos(v: float) -> float:
    return max(v, 0.0)


def _neg(v: float) -> float:
    return max(-v, 0.0)


# -- the activations ---------------------------------------------------------------------
def _elu_like(name: str, alpha: float, gamma: float, emit_phi) -> Curvature:
    """γ·elu_α: convex everywhere for α ≤ 1, a concave kink at 0 for α > 1."""
    def phi(u):
        return gamma * (u if u > 0 else alpha * math.expm1(u))

    def dphi(u):
        return gamma * (1.0 if u > 0 else alpha * math.exp(u))

    def emit_dphi(b, x):
        inner = b.op("Where", [b.op("Greater", [x, b.scalar(0.0)]), b.scalar(1.0),
                               b.mul(b.op("Exp", [x]), b.scalar(alpha))])
        return inner if gamma == 1.0 else b.mul(inner, b.scalar(gamma))
    return Curvature(name, phi, dphi, emit_phi, emit_dphi, lo=-INF, hi=INF if alpha <= 1.0 else 0.0,
                     slope_minus_inf=0.0, slope_plus_inf=gamma, limit_minus_inf=-gamma * alpha)


def _sigmoid(node) -> Curvature:
    def emit_dphi(b, x):
        s = b.op("Sigmoid", [x])
        return b.mul(s, b.sub(b.scalar(1.0), s))
    return Curvature("Sigmoid", _sig, lambda u: _sig(u) * (1 - _sig(u)), lambda b, x: b.op("Sigmoid", [x]),
                     emit_dphi, lo=-INF, hi=0.0, slope_minus_inf=0.0, slope_plus_inf=0.0, limit_minus_inf=0.0)


def _tanh(node) -> Curvature:
    def emit_dphi(b, x):
        t = b.op("Tanh", [x])
        return b.sub(b.scalar(1.0), b.mul(t, t))
    return Curvature("Tanh", math.tanh, lambda u: 1 - math.tanh(u) ** 2, lambda b, x: b.op("Tanh", [x]),
                     emit_dphi, lo=-INF, hi=0.0, slope_minus_inf=0.0, slope_plus_inf=0.0, limit_minus_inf=-1.0)


def _softplus_act(node) -> Curvature:
    return Curvature("Softplus", _softplus, _sig, lambda b, x: b.op("Softplus", [x]),
                     lambda b, x: b.op("Sigmoid", [x]), lo=-INF, hi=INF,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _elu(node) -> Curvature:
    alpha = float(attrs(node).get("alpha", 1.0))
    return _elu_like("Elu", alpha, 1.0, lambda b, x: b.op("Elu", [x], alpha=alpha))


def _selu(node) -> Curvature:
    a = attrs(node)
    alpha = float(a.get("alpha", 1.67326319217681884765625))
    gamma = float(a.get("gamma", 1.05070102214813232421875))
    return _elu_like("Selu", alpha, gamma, lambda b, x: b.op("Selu", [x], alpha=alpha, gamma=gamma))


def expand_node(view, node, fresh, add_init) -> list:
    """Canonicalization's exact replacement of an activation that onnxruntime's CUDA provider has
    no kernel for (nor, for Celu, a float16 or float64 type):
    Celu(x; α) = α·Elu(x/α; 1), Mish(x) = x·Tanh(Softplus(x)) (then fused as one activation)."""
    x, y = node.input[0], node.output[0]
    w = NodeWriter(view, node, fresh, add_init)
    if node.op_type == "Celu":
        alpha = float(attrs(node).get("alpha", 1.0))
        elu = w.op("Elu", [w.op("Mul", [x, w.const(1.0 / alpha, "inv_alpha")])], alpha=1.0)
        w.op("Mul", [elu, w.const(alpha, "alpha")], y)
    else:
        w.op("Mul", [x, w.op("Tanh", [w.op("Softplus", [x])])], y)
    return w.nodes


def _gelu_erf(s: float = math.sqrt(2.0)) -> Curvature:
    """GELU's erf form 0.5·u·(1 + erf(u/s)): s = √2, or the divisor an exported subgraph holds
    (float32 √2 is 1.7e-8 off: the split is that of the function the graph computes)."""
    k = math.sqrt(2.0) / s        # 1 for s = √2: the constants below are then GELU's own

    def phi(u):
        return 0.5 * u * (1.0 + math.erf(u / s))

    def dphi(u):
        return 0.5 * (1.0 + math.erf(u / s)) + u * math.exp(-0.5 * (k * u) ** 2) * k / math.sqrt(2 * math.pi)

    def cdf(b, x):
        return b.mul(b.add(b.op("Erf", [b.mul(x, b.scalar(k / math.sqrt(2.0)))]), b.scalar(1.0)), b.scalar(0.5))

    def emit_phi(b, x):
        return b.mul(x, cdf(b, x))

    def emit_dphi(b, x):
        pdf = b.mul(b.op("Exp", [b.mul(b.mul(x, x), b.scalar(-0.5 * k * k))]), b.scalar(k / math.sqrt(2 * math.pi)))
        return b.add(cdf(b, x), b.mul(x, pdf))
    # GELU'' = ϕ(u)(2 − u²); with u/s for u/√2: k·ϕ(ku)(2 − (ku)²), convex on [−s, s]
    return Curvature("Gelu", phi, dphi, emit_phi, emit_dphi, lo=-s, hi=s,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _gelu_tanh() -> Curvature:
    def v(u):
        return _K * (u + _C * u ** 3)

    def phi(u):
        return 0.5 * u * (1.0 + math.tanh(v(u)))

    def dphi(u):
        t = math.tanh(v(u))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _K * (1 + 3 * _C * u * u)

    def curvature_sign(u):          # φ'' / (1 − T²)
        t, v1, v2 = math.tanh(v(u)), _K * (1 + 3 * _C * u * u), 6 * _K * _C * u
        return v1 - u * t * v1 * v1 + 0.5 * u * v2

    def _t(b, x):
        inner = b.mul(b.add(x, b.mul(b.mul(b.mul(x, x), x), b.scalar(_C))), b.scalar(_K))
        return b.op("Tanh", [inner])

    def emit_phi(b, x):
        return b.mul(b.mul(x, b.scalar(0.5)), b.add(_t(b, x), b.scalar(1.0)))

    def emit_dphi(b, x):
        t = _t(b, x)
        left = b.mul(b.add(t, b.scalar(1.0)), b.scalar(0.5))
        v1 = b.add(b.mul(b.mul(x, x), b.scalar(3 * _C * _K)), b.scalar(_K))
        right = b.mul(b.mul(b.mul(x, b.scalar(0.5)), b.sub(b.scalar(1.0), b.mul(t, t))), v1)
        return b.add(left, right)
    r = _bisect(curvature_sign, 0.5, 5.0)     # even: convex on [−r, r]
    return Curvature("Gelu", phi, dphi, emit_phi, emit_dphi, lo=-r, hi=r,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _gelu(node) -> Curvature:
    approx = attrs(node).get("approximate", "none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return _gelu_tanh() if approx == "tanh" else _gelu_erf()


def silu() -> Curvature:
    """x·σ(x) (SiLU, Swish-1): SiLU'' = σ'(u)(2 + u(1 − 2σ(u)))."""
    def phi(u):
        return u * _sig(u)

    def dphi(u):
        s = _sig(u)
        return s * (1 + u * (1 - s))

    def emit_dphi(b, x):
        s = b.op("Sigmoid", [x])
        return b.mul(s, b.add(b.mul(x, b.sub(b.scalar(1.0), s)), b.scalar(1.0)))
    r = _bisect(lambda u: 2 + u * (1 - 2 * _sig(u)), 0.5, 10.0)
    return Curvature("Silu", phi, dphi, lambda b, x: b.mul(x, b.op("Sigmoid", [x])), emit_dphi, lo=-r, hi=r,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _mish(node) -> Curvature:
    def phi(u):
        return u * math.tanh(_softplus(u))

    def dphi(u):
        t = math.tanh(_softplus(u))
        return t + u * (1 - t * t) * _sig(u)

    def curvature_sign(u):          # Mish'' / ((1 − t²)σ)
        t, s = math.tanh(_softplus(u)), _sig(u)
        return 2 - 2 * u * t * s + u * (1 - s)

    def emit_phi(b, x):
        return b.mul(x, b.op("Tanh", [b.op("Softplus", [x])]))

    def emit_dphi(b, x):
        t = b.op("Tanh", [b.op("Softplus", [x])])
        return b.add(t, b.mul(b.mul(x, b.sub(b.scalar(1.0), b.mul(t, t))), b.op("Sigmoid", [x])))
    lo, hi = _bisect(curvature_sign, -10.0, 0.0), _bisect(curvature_sign, 0.0, 10.0)
    return Curvature("Mish", phi, dphi, emit_phi, emit_dphi, lo=lo, hi=hi,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _hardswish(node) -> Curvature:
    """x·relu6(x + 3)/6: convex on [−3, 3], a concave kink at each end."""
    def phi(u):
        return u * min(max(u + 3.0, 0.0), 6.0) / 6.0

    def dphi(u):                    # torch's convention at the kinks: −0.5 at −3, 1.5 at 3
        return 0.0 if u < -3 else (u / 3.0 + 0.5 if u <= 3 else 1.0)

    def emit_dphi(b, x):
        mid = b.add(b.mul(x, b.scalar(1 / 3.0)), b.scalar(0.5))
        upper = b.op("Where", [b.op("LessOrEqual", [x, b.scalar(3.0)]), mid, b.scalar(1.0)])
        return b.op("Where", [b.op("Less", [x, b.scalar(-3.0)]), b.scalar(0.0), upper])
    return Curvature("HardSwish", phi, dphi, lambda b, x: b.op("HardSwish", [x]), emit_dphi, lo=-3.0, hi=3.0,
                     slope_minus_inf=0.0, slope_plus_inf=1.0, limit_minus_inf=0.0)


def _hardsigmoid(node) -> Curvature:
    """clip(αx + β, 0, 1) (α > 0): convex up to its upper kink (1 − β)/α."""
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))

    def phi(u):
        return min(max(alpha * u + beta, 0.0), 1.0)

    def dphi(u):
        return alpha if 0.0 < alpha * u + beta <= 1.0 else 0.0

    def emit_dphi(b, x):
        z = b.add(b.mul(x, b.scalar(alpha)), b.scalar(beta))
        inside = b.op("And", [b.op("Greater", [z, b.scalar(0.0)]), b.op("LessOrEqual", [z, b.scalar(1.0)])])
        return b.op("Where", [inside, b.scalar(alpha), b.scalar(0.0)])
    return Curvature("HardSigmoid", phi, dphi, lambda b, x: b.op("HardSigmoid", [x], alpha=alpha, beta=beta),
                     emit_dphi, lo=-INF, hi=(1.0 - beta) / alpha,
                     slope_minus_inf=0.0, slope_plus_inf=0.0, limit_minus_inf=0.0)


CURVATURES: dict[str, Callable] = {
    "Sigmoid": _sigmoid, "Tanh": _tanh, "Softplus": _softplus_act, "Elu": _elu, "Selu": _selu,
    "Gelu": _gelu, "HardSwish": _hardswish, "HardSigmoid": _hardsigmoid,
}


def curvature_of(comp, node) -> Curvature:
    """The node's curvature split; φ itself is evaluated by the node's own op (same attributes),
    so that g − h reproduces exactly what the runtime computes for the original output."""
    def make():
        act = CURVATURES[node.op_type](node)
        act.emit_phi = lambda b, x: b.op(node.op_type, [x], **attrs(node))
        return act
    return comp.cached(("curvature", node.name or node.output[0]), make)


# -- the split rule ---------------------------------------------------------------------
def split_curvature(comp, node, act: Curvature, x_in: str, y: str) -> None:
    """Streams of y = φ(x_in) from the streams of x_in by the curvature split."""
    b = comp.b
    sp = comp.stream(x_in)
    share = comp.opts.share_forward
    x = x_in if share else b.sub(sp.p, sp.n, hint=f"{x_in}::d")
    (m1, M1, c01), (m2, M2, c02) = act.parts()
    phi1 = act.phi1(b, x)
    phi = y if share else act.emit_phi(b, x)
    # r_q = Ψ_q(x) − c0_q ≥ 0 (clamped: rounding only)
    r1 = b.relu(_affine(b, phi1, x, -m1, -c01), hint=f"{y}::r1")
    r2 = b.relu(_affine(b, b.sub(phi1, phi), x, -m2, -c02), hint=f"{y}::r2")
    coef_PP, coef_PN = _pos(m1) + _neg(m2), _neg(m1) + (M1 - m1) + _pos(m2) + (M2 - m2)
    coef_NP, coef_NN = _neg(m1) + _pos(m2), _pos(m1) + (M1 - m1) + _neg(m2) + (M2 - m2)
    P = _combine(comp, r1, sp, coef_PP, coef_PN, _pos(c01) + _neg(c02), f"{y}::P")
    N = _combine(comp, r2, sp, coef_NP, coef_NN, _neg(c01) + _pos(c02), f"{y}::N")
    set_streams(comp, y, P, N, recenter=True)


def _affine(b, base: str, x: str, slope: float, const: float) -> str:
    out = base
    if slope != 0.0:
        out = b.add(out, b.mul(x, b.scalar(slope)))
    if const != 0.0:
        out = b.add(out, b.scalar(const))
    return out


def _combine(comp, r: str, sp, cp: float, cn: float, const: float, hint: str) -> str:
    b = comp.b
    out = r
    if cp != 0.0 and not comp.is_zero(sp.p):
        out = b.add(out, b.mul(sp.p, b.scalar(cp)))
    if cn != 0.0 and not comp.is_zero(sp.n):
        out = b.add(out, b.mul(sp.n, b.scalar(cn)))
    if const != 0.0:
        out = b.add(out, b.scalar(const), hint=hint)
    return out


def _split(comp, node):
    split_curvature(comp, node, curvature_of(comp, node), node.input[0], node.output[0])


def _backward(comp, node, rs, cts):
    return [(node.input[0], rs.smooth(cts[0], node, curvature_of(comp, node), node.input[0]))]


def _check_positive(attr: str, default: float):
    def check(view, node, data_in, final):
        v = float(attrs(node).get(attr, default))
        if not v > 0.0:
            return f"{attr}={v} must be positive for the curvature split"
        return None
    return check


_DOC = {
    "Sigmoid": "curvature split at the inflection point 0 (convex below, concave above)",
    "Tanh": "curvature split at the inflection point 0 (convex below, concave above)",
    "Softplus": "convex rule (slopes in [0, 1])",
    "Elu": "convex rule for alpha <= 1; a concave kink at 0 split off for alpha > 1",
    "Selu": "gamma * Elu(alpha): a concave kink at 0 split off for alpha > 1",
    "Gelu": "curvature split at +-sqrt(2) (erf form) or the tanh form's inflection points",
    "HardSwish": "curvature split: convex on [-3, 3], concave kinks at -3 and 3",
    "HardSigmoid": "curvature split: its upper kink split off",
}
_CHECKS = {"Elu": _check_positive("alpha", 1.0),
           "Selu": lambda *a: _check_positive("alpha", 1.67)(*a) or _check_positive("gamma", 1.05)(*a),
           "HardSigmoid": _check_positive("alpha", 0.2)}

for _op in CURVATURES:
    op_spec(OpSpec(_op, "smooth", split=_split, backward=_backward, shift=True, recenter=True,
                   doc=_DOC[_op], check=_CHECKS.get(_op)))
canonical_rewrite("Celu", "smooth", "alpha * Elu(x / alpha) (exact)", "expand_activation",
                  check=_check_positive("alpha", 1.0))
canonical_rewrite("Mish", "smooth", "x * Tanh(Softplus(x)) (exact), converted as one activation",
                  "expand_activation")
