"""SplitLRP: ε-LRP through the nonnegative stream graph (docs/method.md §4).

A cotangent is (R_p, R_n): relevance on the p- and the n-stream of a tensor.
Every rule is linear in the relevance (the ε-rule's ratios use fixed forward
values), so instead of propagating g-relevance and h-relevance separately and
subtracting at the end, one state is propagated from the seed
(R_P, R_N) = (g_k, −h_k) at the explained logit: at every tensor it holds
g-relevance minus h-relevance, which is what the map needs. Denominators are
each op's own output streams (before recentering); recentering passes
relevance unchanged. A part that is structurally zero (the n-stream after a
recentered Relu) is None and costs nothing.

Relevance on a p-stream is always that stream times something (the ε-rule), or
moved from such relevance by data movement, winner-takes-all routing or sums;
it vanishes wherever its stream does. Such names are kept in `p_supported`.
A smooth activation passes relevance unchanged to input streams that may vanish
where its output's do not (a recentered stream is 0 on one side), so what it
passes is not p-supported (a new name). Behind it a weight layer's ratio
R/(Z + ε) is of order R/ε where its stream Z is 0, though every contribution
there is 0 (z ≤ Z); the W⁺ᵀ and W⁻ᵀ products, as half-sums of |W|ᵀ and Wᵀ
products, would leave that ratio's rounding in the neighbours' shares: the
ratio of such relevance is 0 where Z is 0 to rounding (Z ≤ 16 ulp of the
pair sum Z + Z', the rounding of (S ± D)/2 in the sum/difference form).
Under recentering a Relu's output p-stream is relu(x), zero where the mask is
zero, so the Relu rule's (1 − m)·R_Yp share to the N-stream is exactly zero:
the N part stays None and the next weight layer needs one product (W⁺ᵀ), not
two. Injected vectors are not p-supported and take the full rule.
"""
from __future__ import annotations

import numpy as np

from .base import RuleSet


class SplitLRP(RuleSet):
    name = "splitlrp"
    parts = 2
    slots = 1
    needs_streams = True

    def __init__(self, comp):
        super().__init__(comp)
        self.eps = self.b.scalar(comp.opts.lrp_epsilon)
        self.p_supported: set[str] = set()   # relevance names that vanish where their p-stream does

    def _supported(self, out, *inputs):
        """Mark `out` p-supported when every non-None input is."""
        if out is not None and all(i is None or i in self.p_supported for i in inputs):
            self.p_supported.add(out)
        return out

    def _each(self, ct, move):
        """Both parts moved alike (data movement, winner-takes-all routing): support is kept."""
        moved = tuple(None if r is None else move(r) for r in ct)
        self._supported(moved[0], ct[0])
        return moved

    def _denominator(self, name):
        return self.comp.cached(("lrp_den", name), lambda: self.b.add(name, self.eps))

    def _ratio(self, R, Z):
        return None if R is None else self.b.div(R, self._denominator(Z))

    def _where_resolved(self, s, stream, other):
        """s where the stream exceeds its rounding (16 ulp of the pair sum), else 0: every
        contribution to a zero stream is 0."""
        if s is None:
            return None
        b = self.b
        ulps = 16 * float(np.finfo(b.float_dtype).eps)
        floor = b.scalar(0.0) if self.comp.is_zero(other) else b.mul(b.add(stream, other), b.scalar(ulps))
        return self.comp.where(b.op("Greater", [stream, floor]), s)

    def _times(self, stream, c):
        """stream ⊙ c, or None when the stream is structurally zero."""
        if c is None or self.comp.is_zero(stream):
            return None
        out = self.b.mul(stream, c)
        self.p_supported.add(out)     # only the first part of a cotangent is ever read as such
        return out

    def _add(self, a, c):
        if a is None:
            return c
        if c is None:
            return a
        return self.b.add(a, c)

    def seed(self, onehot):
        sp = self.comp.stream(self.comp.explained)
        b = self.b
        rp = b.mul(onehot, sp.p, hint="lrpseed/p")
        self.p_supported.add(rp)
        return (rp, b.neg(b.mul(onehot, sp.n), hint="lrpseed/n"))

    def inject(self, vector):
        return (vector, None)

    def vector(self, ct):
        RP, RN = ct
        return self._add(RP, RN)

    def linear(self, ct, lin):
        RP, RN = ct
        if RP is None and RN is None:     # no relevance reaches this op (e.g. x − relu(conv x))
            return ct
        if lin.kind == "move":
            return self._each(ct, lin.transpose)
        b = self.b
        pre, post = self.comp.pre_stream(lin.y), self.comp.stream(lin.x)
        sP, sN = self._ratio(RP, pre.p), self._ratio(RN, pre.n)
        if RP not in self.p_supported:
            sP, sN = self._where_resolved(sP, pre.p, pre.n), self._where_resolved(sN, pre.n, pre.p)
        if lin.nonneg:
            cp = None if sP is None else lin.transpose(sP)
            cn = None if sN is None else lin.transpose(sN)
        elif sN is None or sP is None:
            s = sP if sN is None else sN          # W⁺ᵀ to its own stream, W⁻ᵀ across
            want_p, want_n = not self.comp.is_zero(post.p), not self.comp.is_zero(post.n)
            if sN is None:
                cp = lin.transpose(s, "pos") if want_p else None
                cn = lin.transpose(s, "neg") if want_n else None
            else:
                cp = lin.transpose(s, "neg") if want_p else None
                cn = lin.transpose(s, "pos") if want_n else None
        else:
            cs = lin.transpose(b.add(sP, sN), "abs")
            cd = lin.transpose(b.sub(sP, sN), "W")
            cp, cn = b.half(b.add(cs, cd)), b.half(b.sub(cs, cd))
        return (self._times(post.p, cp), self._times(post.n, cn))

    def relu(self, ct, node):
        RP, RN = ct
        if RP is None:
            return ct
        if RN is None and RP in self.p_supported and self.comp.opts.stabilize == "recenter":
            return (RP, None)      # R_Yp is 0 where m is: R_P = m·R_Yp = R_Yp, R_N = (1 − m)·R_Yp = 0
        m = self.mask(node)
        routed = self.b.add(RP, RN) if RN is not None else RP
        # m·R_Yp vanishes where P does (P = 0 ⇒ x ≤ 0 ⇒ m = 0) if R_Yp vanishes where Y_p does
        kept = self._supported(self.comp.where(m, RP), RP)
        return (kept, self.comp.where(m, RN if RN is not None else self.b.scalar(0.0), routed))

    def product(self, ct, node):
        """P' = ½(P+Q)² + ½(N+R)², N' = ½(P+R)² + ½(N+Q)² (u = P − N, v = Q − R): each square
        takes relevance in proportion to its share of its stream (ε-rule) and passes it to its
        two summands in proportion to their values; relevance is conserved up to ε."""
        RP, RN = ct
        u, v, y = node.input[0], node.input[1], node.output[0]
        if RP is None and RN is None:
            return ct, ct
        b, comp = self.b, self.comp
        pre = comp.pre_stream(y)
        sP, sN = self._ratio(RP, pre.p), self._ratio(RN, pre.n)
        su, sv = comp.stream(u), comp.stream(v)
        P, N, Q, R = su.p, su.n, sv.p, sv.n

        def weights(first, second):      # ½(first·sP + second·sN), None-aware
            terms = [b.mul(t, s) for t, s in ((first, sP), (second, sN)) if s is not None]
            return b.half(terms[0] if len(terms) == 1 else b.add(*terms))
        PQ, NR, PR, NQ = b.add(P, Q), b.add(N, R), b.add(P, R), b.add(N, Q)
        parts = [(P, weights(PQ, PR), u), (N, weights(NR, NQ), u), (Q, weights(PQ, NQ), v), (R, weights(NR, PR), v)]
        out = []
        for stream, w, like in parts:
            r = self._times(stream, w)
            red = None if r is None else self.reduce_to(r, like, y)
            out.append(self._supported(red, r) if red is not r else red)
        return (out[0], out[1]), (out[2], out[3])

    def smooth(self, ct, node, act, x):
        """Relevance passes a smooth activation unchanged on each stream (docs/method.md); the
        input's streams may vanish where the output's do not: what passes is not p-supported."""
        RP, RN = ct
        if RP in self.p_supported:
            RP = self.b.op("Identity", [RP], hint=f"{x}::lrp_passed")
        return (RP, RN)

    def maxpool(self, ct, win):
        RP, RN = ct
        if RP is None and RN is None:
            return ct
        if self.comp.opts.maxpool == "wta":
            return self._each(ct, win.route)
        b = self.b
        pre, post = self.comp.pre_stream(win.y), self.comp.stream(win.x)
        sP, sN = self._ratio(RP, pre.p), self._ratio(RN, pre.n)
        top = None if sP is None else win.route(sP)
        spread = win.window_sum_T(self._add(sP, sN))
        rest = spread if top is None else b.sub(spread, top)
        return (self._times(post.p, top), self._times(post.n, rest))

    def sum2(self, ct, node, sign):
        RP, RN = ct
        pre = self.comp.pre_stream(node.output[0])
        sP, sN = self._ratio(RP, pre.p), self._ratio(RN, pre.n)
        a, c = self.comp.stream(node.input[0]), self.comp.stream(node.input[1])
        ra = (self._times(a.p, sP), self._times(a.n, sN))
        if sign > 0:
            rc = (self._times(c.p, sP), self._times(c.n, sN))
        else:   # P = p_a + n_c, N = n_a + p_c
            rc = (self._times(c.p, sN), self._times(c.n, sP))
        return ra, rc

    def accumulate(self, cts, name):
        if len(cts) == 1:
            return cts[0]
        out = []
        for i in range(2):
            parts = [c[i] for c in cts if c[i] is not None]
            out.append(None if not parts else parts[0] if len(parts) == 1 else
                       self.b.op("Sum", parts, hint=f"{name}::ct.lrp{i}"))
        self._supported(out[0], *[c[0] for c in cts])
        return tuple(out)

    def move_multi(self, ct, pieces):
        per_part = [None if part is None else pieces(part) for part in ct]
        n = len(next(p for p in per_part if p is not None))
        if per_part[0] is not None:
            for piece in per_part[0]:
                self._supported(piece, ct[0])
        return [tuple(None if pp is None else pp[j] for pp in per_part) for j in range(n)]

    def map_at(self, ct, like: str) -> str:
        """R_p + R_n: g-relevance minus h-relevance, channels kept."""
        RP, RN = ct
        total = self._add(RP, RN)
        return total if total is not None else self.b.zeros_like(like)
