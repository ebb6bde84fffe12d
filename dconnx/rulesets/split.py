"""The four split sensitivities δpp, δnp, δpn, δnn with the α-shift (docs/method.md §3).

Cotangents are kept in pair sum/difference form, `a = δ·p + δ·n` (transposed
through |W|) and `d = δ·p − δ·n` (transposed through W):

* layout "full": a = [s_g; s_h], d = [d_g; d_h] stacked on the batch axis, any
  Relu backward mode;
* layout "grad" ("standard" mode only): a = σ (the equal pair sums of g and h),
  d = ∇f = d_g − d_h. Enough for SplitGrad and SplitCAM: δpp + δnn = σ + ½∇f.
"""
from __future__ import annotations

from .base import RuleSet


class SplitSensitivities(RuleSet):
    name = "split"
    parts = 2
    needs_streams = False

    def __init__(self, comp, layout: str):
        super().__init__(comp)
        self.mode = comp.opts.relu_backward
        if layout == "grad" and self.mode != "standard":
            raise ValueError("the 'grad' layout holds only in the 'standard' Relu backward mode")
        self.layout = layout
        self.slots = 1 if layout == "grad" else 2

    def seed(self, onehot):
        b = self.b
        half = b.half(onehot, hint="seed/half")
        if self.layout == "grad":
            return (half, onehot)
        return (b.concat([half, half], 0, hint="seed/a"),
                b.concat([half, b.neg(half)], 0, hint="seed/d"))

    def linear(self, ct, lin):
        a, d = ct
        return (lin.transpose(a, "W" if lin.nonneg else "abs"), lin.transpose(d, "W"))

    def relu(self, ct, node):
        a, d = ct
        b, where = self.b, self.comp.where
        m = self.mask(node)
        if self.mode == "standard":
            if self.layout == "grad":
                return (a, where(m, d))
            return (a, where(m, d, b.neg(a)))          # d' = m ⊙ (d + a) − a
        if self.mode == "sum":
            return (where(m, a, b.sub(a, d)), where(m, d))   # a' = a − (1 − m) d, d' = m d
        # mask_diff: a' = m a + (m − 1) d, d' = (m − 1) a + m d
        return (where(m, a, b.neg(d)), where(m, d, b.neg(a)))

    def maxpool(self, ct, win):
        a, d = ct
        k = self.slots
        if self.comp.opts.maxpool == "wta":
            return (win.route(a, k), win.route(d, k))
        spread = win.window_sum_T(a)
        if self.layout == "grad":
            return (spread, win.route(d, k))
        # δp gets the argmax share of δP, δn the window sums of δP + δN minus that share
        return (spread, self.b.sub(win.route(self.b.add(a, d), k), spread))

    def sum2(self, ct, node, sign):
        if sign > 0:
            return ct, ct
        a, d = ct
        return ct, (a, self.b.neg(d))

    def smooth(self, ct, node, act, x):
        """σ ← c·σ, d ← φ'(x)·d (+ (φ₁' + φ₂' − M₁ − M₂)·a in the full layout: it cancels in g − h)."""
        a, d = ct
        b = self.b
        slope = self.activation_slope(node, act, x)
        a2 = b.mul(a, b.scalar(act.pair_gain()))
        if self.layout == "grad":
            return (a2, b.mul(d, slope))
        def coupling():
            (_, M1, _), (_, M2, _) = act.parts()
            two_phi1 = b.mul(act.dphi1(b, x), b.scalar(2.0))
            return b.sub(two_phi1, b.add(self.comp.cached(("dphi", node.output[0]),
                                                          lambda: act.emit_dphi(b, x)), b.scalar(M1 + M2)))
        k = self.tile(self.comp.cached(("dphi_coupling", node.output[0]), coupling))
        return (a2, b.add(b.mul(d, slope), b.mul(a, k)))

    def product(self, ct, node):
        """y = u·v (polarization): both pair sums times S = (p+n)_u + (p+n)_v; the differences
        d_u = u·a + v·d, d_v = v·a + u·d (grad layout: σ_u = S·σ, ∇_u = v·∇f)."""
        a, d = ct
        b, comp = self.b, self.comp
        u, v, y = node.input[0], node.input[1], node.output[0]
        S = self.tile(comp.cached(("product_S", y), lambda: b.add(comp.stream_sum(u), comp.stream_sum(v))))
        A = b.mul(a, S)
        tu, tv = self.tile(u), self.tile(v)
        if self.layout == "grad":
            du, dv = b.mul(d, tv), b.mul(d, tu)
        else:
            du, dv = b.add(b.mul(a, tu), b.mul(d, tv)), b.add(b.mul(a, tv), b.mul(d, tu))
        return ((self.reduce_to(A, u, y), self.reduce_to(du, u, y)),
                (self.reduce_to(A, v, y), self.reduce_to(dv, v, y)))

    def shift(self, ct, factor):
        a, d = ct
        return (self.b.mul(a, factor), d)

    def vector(self, ct):
        return self.splitgrad_sens(ct)

    # -- reading the sensitivities at a tensor ----------------------------
    def splitgrad_sens(self, ct) -> str:
        """δpp + δnn, batch-sized."""
        a, d = ct
        b = self.b
        if self.layout == "grad":
            return b.add(a, b.half(d))
        B = self._batch(a)
        sg, sh = self._halves(a, B)
        dg, dh = self._halves(d, B)
        return b.half(b.add(b.add(sg, sh), b.sub(dg, dh)))

    def four(self, ct) -> tuple[str, str, str, str]:
        """(δpp, δnp, δpn, δnn), batch-sized (layout 'full' only)."""
        a, d = ct
        b = self.b
        B = self._batch(a)
        sg, sh = self._halves(a, B)
        dg, dh = self._halves(d, B)
        return (b.half(b.add(sg, dg)), b.half(b.sub(sg, dg)),
                b.half(b.add(sh, dh)), b.half(b.sub(sh, dh)))

    def _batch(self, x):
        return self.comp.batch_size()

    def _halves(self, x, B):
        b = self.b
        two = b.op("Split", [x, b.concat([B, B], 0)], out=2, axis=0)
        return two[0], two[1]
