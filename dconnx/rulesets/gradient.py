"""The plain gradient and guided backprop on the original graph (docs/baselines.md).

A cotangent is one tensor: ∂f_k/∂t for the explained logit k (seed e_k).
Both rule sets transpose every linear op with its own weight W, route max
pooling to the argmax and mask Relu with 1[x > 0]; guided backprop also drops
the negative part of the gradient leaving every Relu (Springenberg et al.;
Captum's GuidedBackprop). There is no α-shift: the walk's shift points pass
the cotangent on (base class).
"""
from __future__ import annotations

from ..ops.activation import clip_piece
from .base import RuleSet


class PlainGradient(RuleSet):
    name = "gradient"
    parts = 1
    slots = 1

    def seed(self, onehot):
        return (onehot,)

    def linear(self, ct, lin):
        return (lin.transpose(ct[0], "W"),)

    def relu(self, ct, node):
        return (self.comp.where(self.mask(node), ct[0]),)

    def maxpool(self, ct, win):
        return (win.route(ct[0]),)

    def product(self, ct, node):
        return self.product_gradient(ct, node)

    def smooth(self, ct, node, act, x):
        """φ'(x)·g (guided backprop too: it modifies only the Relu's backward, as Captum's)."""
        return (self.b.mul(ct[0], self.activation_slope(node, act, x)),)

    def sum2(self, ct, node, sign):
        if sign > 0:
            return ct, ct
        return ct, (self.b.neg(ct[0]),)


class GuidedBackprop(PlainGradient):
    """Relu backward `1[x > 0] ⊙ relu(g)`: Captum's relu(grad_input) of a ReLU module. The two
    Relus of a canonical Clip (ReLU6, Hardtanh) keep the plain gradient, as Captum leaves those
    modules alone: with the guided rule on each piece, a saturated ReLU6 (both masks 1) would pass
    relu(g) − relu(−g) = g where its derivative is 0."""
    name = "guided"

    def relu(self, ct, node):
        if clip_piece(self.comp.view, node):
            return super().relu(ct, node)
        return (self.comp.where(self.mask(node), self.b.relu(ct[0])),)
