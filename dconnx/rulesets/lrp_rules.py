"""LRP-ε, LRP-γ, LRP-z⁺ on the original graph, rule for rule as Zennit 0.5's composites
define them (docs/baselines.md).

A cotangent is one tensor, the relevance R at a tensor. The seed is
R = f_k·e_k (the explained logit). Which rule an op gets is decided by a
`Composite` (Zennit's layer map): Conv → the composite's conv rule (the first
Conv may have its own), Gemm/MatMul → the dense rule, average pooling and the
sum of two data tensors → Norm, Relu, the smooth activations and an unfolded
BatchNormalization → Pass, and every other op (max pooling, data movement,
constant affine ops, the product of two data tensors of a gate) → its
gradient, as Zennit leaves modules without a rule and functional ops alone.

Forward values are the original activations (canonical tensor names); z with
modified weights comes from `lin.apply(x, variant) + lin.bias(variant)`.
Every denominator is stabilized as Zennit's `stabilize`: z + ε·sign(z), sign(0) = +1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from ..ops import KEEPS_SIGN   # ops through which a nonnegative tensor stays nonnegative
from .base import RuleSet

STABILIZER = 1e-6          # Zennit's `stabilizer` default for every rule but Epsilon
CONV_RULES = ("epsilon", "gamma", "zplus")
FIRST_RULES = (None, "zbox")


@dataclass(frozen=True)
class Composite:
    """Which LRP rule each layer kind gets (a Zennit layer map)."""
    conv: str                   # "epsilon" | "gamma" | "zplus"
    dense: str = "epsilon"      # Gemm / MatMul (torch.nn.Linear)
    first: str | None = None    # rule of the first Conv (the one reading the input): None | "zbox"
    gamma: float = 0.25
    zennit: str = ""            # the Zennit composite it reproduces (documentation)

    def __post_init__(self):
        if self.conv not in CONV_RULES or self.dense not in CONV_RULES or self.first not in FIRST_RULES:
            raise ValueError(f"unknown LRP rule in {self}")


def known_nonneg(comp, t: str) -> bool:
    """True where t is ≥ 0 by construction (a Relu output, moved or pooled)."""
    def make():
        node = comp.view.producer.get(t)
        if node is None:
            return False
        if node.op_type == "Relu":
            return True
        data = [i for i in node.input if i and comp.view.is_data(i)]
        if node.op_type in KEEPS_SIGN:
            return bool(data) and all(known_nonneg(comp, i) for i in data)
        return False
    return comp.cached(("nonneg", t), make)


class LRPRules(RuleSet):
    parts = 1
    slots = 1

    def __init__(self, comp, name: str, composite: Composite):
        super().__init__(comp)
        self.name = name
        self.composite = composite
        self.eps = float(comp.opts.lrp_epsilon)
        self._first = None

    # -- helpers -------------------------------------------------------------
    def _stab(self, z: str, eps: float) -> str:
        """Zennit's stabilize: z + ε·sign(z) with sign(0) = +1, as z + (z ≥ 0 ? ε : −ε): three passes
        over z instead of Where(z ≥ 0, z + ε, z − ε)'s four, the same numbers (z − ε = z + (−ε))."""
        def make():
            b = self.b
            nonneg = b.op("GreaterOrEqual", [z, b.scalar(0.0)], hint=f"{z}::sign")
            return b.add(z, self.comp.where(nonneg, b.scalar(eps), b.scalar(-eps)))
        return self.comp.cached(("lrp_stab", z, eps), make)

    def _plus(self, a, c):
        if a is None:
            return c
        if c is None:
            return a
        return self.b.add(a, c)

    def _first_convs(self) -> set[str]:
        """The Conv nodes reading the model input (else the first Conv): Zennit's `first_map` layer."""
        if self._first is None:
            convs = [n for n in self.comp.model.graph.node if n.op_type == "Conv"]
            direct = {n.name or n.output[0] for n in convs if n.input[0] == self.comp.input_name}
            self._first = direct or ({convs[0].name or convs[0].output[0]} if convs else set())
        return self._first

    def _bounds(self, lin) -> tuple[str, str]:
        """ZBox bounds (low, high) shaped like one input sample: (0 − mean)/std, (1 − mean)/std."""
        def make():
            b = self.b
            shape = self.comp.view.shape(lin.x)
            c = shape[1]
            mean = np.asarray(self.comp.opts.mean if self.comp.opts.mean else [0.0], dtype=np.float64)
            std = np.asarray(self.comp.opts.std if self.comp.opts.std else [1.0], dtype=np.float64)
            if mean.size not in (1, c) or std.size not in (1, c):
                raise OptionError(f"mean/std have {mean.size}/{std.size} values; the input has {c} channels")
            full = b.ints([1] + list(shape[1:]))
            out = []
            for value in ((0.0 - mean) / std, (1.0 - mean) / std):
                per_channel = np.broadcast_to(value, (c,)).reshape([1, c] + [1] * (len(shape) - 2))
                const = b.const(per_channel.astype(b.float_dtype), hint="zbox_bound")
                out.append(b.op("Expand", [const, full], hint=f"{lin.x}::zbox_bound"))
            return tuple(out)
        return self.comp.cached(("zbox_bounds", lin.x), make)

    def _rule_of(self, lin) -> str:
        op = lin.node.op_type
        if op == "Conv":
            key = lin.node.name or lin.node.output[0]
            if self.composite.first and key in self._first_convs():
                return self.composite.first
            return self.composite.conv
        return self.composite.dense

    # -- the rules -----------------------------------------------------------
    def _epsilon(self, R, lin, eps):
        """R_in = x ⊙ Wᵀ(R / stab(z)), z = W x + b (the original output); Norm for pooling."""
        s = self.b.div(R, self._stab(lin.y, eps))
        return self.b.mul(lin.x, lin.transpose(s, "W"))

    def _zplus(self, R, lin):
        """z = W⁺x⁺ + W⁻x⁻ + b⁺ (W⁻, x⁻ ≤ 0): R_in = x⁺ ⊙ W⁺ᵀs + x⁻ ⊙ W⁻ᵀs."""
        b = self.b
        x = lin.x
        nonneg = known_nonneg(self.comp, x)
        P = x if nonneg else b.relu(x)
        N = None if nonneg else b.relu(b.neg(x))
        z = lin.apply(P, "pos")
        if N is not None:
            z = b.add(z, lin.apply(N, "neg"))
        z = self._plus(z, lin.bias("pos"))
        s = b.div(R, self._stab(z, STABILIZER))
        out = b.mul(P, lin.transpose(s, "pos"))
        if N is not None:
            out = b.add(out, b.mul(N, lin.transpose(s, "neg")))
        return out

    def _gamma(self, R, lin):
        """Zennit's generalized γ-rule (signed inputs). With W⁻, b⁻, x⁻ ≤ 0 (Zennit's
        clamp(max=0)), G = W + γW⁺ and H = W + γW⁻:
        z₊ = G x⁺ + H x⁻ + b + γb⁺ = y + γ(W⁺x⁺ + W⁻x⁻ + b⁺), used where y > 0,
        z₋ = H x⁺ + G x⁻ + b + γb⁻ = y + γ(W⁻x⁺ + W⁺x⁻ + b⁻), used where y < 0,
        R_in = x⁺ ⊙ (Gᵀs₊ + Hᵀs₋) + x⁻ ⊙ (Hᵀs₊ + Gᵀs₋), s± = R / stab(z±).
        In our variants W⁻ = −"neg" and x⁻ = −relu(−x)."""
        b = self.b
        x, y = lin.x, lin.y
        g = b.scalar(self.composite.gamma)
        nonneg = known_nonneg(self.comp, x)
        P = x if nonneg else b.relu(x)
        N = None if nonneg else b.relu(b.neg(x))          # |x⁻|
        up, un = lin.apply(P, "pos"), lin.apply(P, "neg")
        if N is not None:
            up = b.add(up, lin.apply(N, "neg"))
            un = b.add(un, lin.apply(N, "pos"))
        up, un = self._plus(up, lin.bias("pos")), self._plus(un, lin.bias("neg"))
        zp = b.add(y, b.mul(g, up), hint=f"{y}::gamma_zp")
        zn = b.sub(y, b.mul(g, un), hint=f"{y}::gamma_zn")
        zero = b.scalar(0.0)
        sp = self.comp.where(b.op("Greater", [y, zero]), b.div(R, self._stab(zp, STABILIZER)))
        sn = self.comp.where(b.op("Less", [y, zero]), b.div(R, self._stab(zn, STABILIZER)))
        common = lin.transpose(b.add(sp, sn), "W")
        # Gᵀs₊ + Hᵀs₋ = Wᵀ(s₊ + s₋) + γ(W⁺ᵀs₊ − |W⁻|ᵀs₋)
        u = b.add(common, b.mul(g, b.sub(lin.transpose(sp, "pos"), lin.transpose(sn, "neg"))))
        out = b.mul(P, u)
        if N is not None:
            # Hᵀs₊ + Gᵀs₋ = Wᵀ(s₊ + s₋) + γ(W⁺ᵀs₋ − |W⁻|ᵀs₊); x⁻ = −N
            v = b.add(common, b.mul(g, b.sub(lin.transpose(sn, "pos"), lin.transpose(sp, "neg"))))
            out = b.sub(out, b.mul(N, v))
        return out

    def _zbox(self, R, lin):
        """zβ with bounds l ≤ x ≤ h: z = W x − W⁺l − W⁻h (Zennit's biases cancel),
        R_in = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs (W⁻ ≤ 0)."""
        b = self.b
        low, high = self._bounds(lin)
        z = b.add(b.sub(lin.apply(lin.x, "W"), lin.apply(low, "pos")), lin.apply(high, "neg"),
                  hint=f"{lin.y}::zbox_z")
        s = b.div(R, self._stab(z, STABILIZER))
        out = b.sub(b.mul(lin.x, lin.transpose(s, "W")), b.mul(low, lin.transpose(s, "pos")))
        return b.add(out, b.mul(high, lin.transpose(s, "neg")))

    # -- the rule-set interface ---------------------------------------------
    def seed(self, onehot):
        return (self.b.mul(onehot, self.comp.explained, hint="lrpseed"),)

    def inject(self, vector):
        return (vector,)

    def linear(self, ct, lin):
        with self.comp.folding_signed_parts():
            return self._linear(ct, lin)

    def _linear(self, ct, lin):
        R = ct[0]
        if lin.kind == "move":
            return (lin.transpose(R),)
        if lin.kind == "affine":                 # a functional op: Zennit passes the gradient
            return (lin.transpose(R, "W"),)
        if lin.kind == "pool":                   # Zennit: Norm on AvgPool / AdaptiveAvgPool
            return (self._epsilon(R, lin, STABILIZER),)
        if lin.node.op_type == "BatchNormalization":   # not folded: Zennit's Pass on BatchNorm
            return ct
        rule = self._rule_of(lin)
        if rule == "epsilon":
            return (self._epsilon(R, lin, self.eps),)
        if rule == "gamma":
            return (self._gamma(R, lin),)
        if rule == "zplus":
            return (self._zplus(R, lin),)
        return (self._zbox(R, lin),)

    def relu(self, ct, node):
        return ct                                # Zennit: Pass on activations

    def smooth(self, ct, node, act, x):
        return ct                                # Zennit: Pass on activations

    def maxpool(self, ct, win):
        return (win.route(ct[0]),)               # no rule: the gradient

    def product(self, ct, node):
        """A product of two data tensors (a squeeze-excitation gate times its signal, a GLU): no
        rule, the gradient, as Zennit leaves the functional `scale * input` of torchvision's
        SqueezeExcitation alone: R·b to a and R·a to b."""
        return self.product_gradient(ct, node)

    def sum2(self, ct, node, sign):
        """Norm on a sum of two data tensors (Zennit's ResNet canonizers make residual adds a Sum)."""
        b = self.b
        s = b.div(ct[0], self._stab(node.output[0], STABILIZER))
        ra = b.mul(node.input[0], s)
        rb = b.mul(node.input[1], s)
        return (ra,), ((rb if sign > 0 else b.neg(rb)),)
