"""SplitLRP: ε-LRP through the nonnegative stream graph (docs/method.md §4).

A cotangent is (R_p, R_n): the relevance on the p- and n-stream of a tensor,
each stacked [g-relevance; h-relevance] on the batch axis. Denominators are
each op's own output streams (before recentering); recentering passes
relevance unchanged.
"""
from __future__ import annotations

from .base import RuleSet


class SplitLRP(RuleSet):
    name = "splitlrp"
    parts = 2
    slots = 2
    needs_streams = True

    def __init__(self, comp):
        super().__init__(comp)
        self.eps = self.b.scalar(comp.opts.lrp_epsilon)

    def _streams(self, tensor, pre=False):
        sp = self.comp.pre_stream(tensor) if pre else self.comp.stream(tensor)
        return self.tile(sp.p), self.tile(sp.n)

    def _ratio(self, R, Z):
        return self.b.div(R, self.b.add(Z, self.eps))

    def seed(self, onehot):
        b = self.b
        g, h = self._stream_values_at_output()
        zero = b.zeros_like(onehot)
        return (b.concat([b.mul(onehot, g), zero], 0, hint="lrpseed/p"),
                b.concat([zero, b.mul(onehot, h)], 0, hint="lrpseed/n"))

    def _stream_values_at_output(self):
        sp = self.comp.stream(self.comp.explained)
        return sp.p, sp.n

    def linear(self, ct, lin):
        RP, RN = ct
        if lin.kind == "move":
            return (lin.transpose(RP), lin.transpose(RN))
        b = self.b
        P, N = self._streams(lin.y, pre=True)
        p, n = self._streams(lin.x)
        sP, sN = self._ratio(RP, P), self._ratio(RN, N)
        if lin.nonneg:
            cp, cn = lin.transpose(sP), lin.transpose(sN)
        else:
            cs = lin.transpose(b.add(sP, sN), "abs")
            cd = lin.transpose(b.sub(sP, sN), "W")
            cp, cn = b.half(b.add(cs, cd)), b.half(b.sub(cs, cd))
        return (b.mul(p, cp), b.mul(n, cn))

    def relu(self, ct, node):
        RP, RN = ct
        m = self.mask(node)
        return (self.comp.where(m, RP), self.comp.where(m, RN, self.b.add(RP, RN)))

    def maxpool(self, ct, win):
        RP, RN = ct
        if self.comp.opts.maxpool == "wta":
            return (win.route(RP, 2), win.route(RN, 2))
        b = self.b
        P, N = self._streams(win.y, pre=True)
        p, n = self._streams(win.x)
        sP, sN = self._ratio(RP, P), self._ratio(RN, N)
        top = win.route(sP, 2)
        return (b.mul(p, top), b.mul(n, b.sub(win.window_sum_T(b.add(sP, sN)), top)))

    def sum2(self, ct, node, sign):
        RP, RN = ct
        b = self.b
        P, N = self._streams(node.output[0], pre=True)
        sP, sN = self._ratio(RP, P), self._ratio(RN, N)
        pa, na = self._streams(node.input[0])
        pb, nb = self._streams(node.input[1])
        ra = (b.mul(pa, sP), b.mul(na, sN))
        if sign > 0:
            rb = (b.mul(pb, sP), b.mul(nb, sN))
        else:   # P = p_a + n_b, N = n_a + p_b
            rb = (b.mul(pb, sN), b.mul(nb, sP))
        return ra, rb

    def map_at(self, ct) -> str:
        """Σ over the two streams of g-relevance minus h-relevance, batch-sized (channels kept)."""
        b = self.b
        RP, RN = ct
        tot = b.add(RP, RN)
        B = self.comp.batch_size()
        g, h = b.op("Split", [tot, b.concat([B, B], 0)], out=2, axis=0)
        return b.sub(g, h)
