"""The rule-set interface and what all rule sets share."""
from __future__ import annotations

from ..compilation import Compilation


class RuleSet:
    """Base class. A cotangent is a tuple of tensor names (`parts`), each stacked
    `slots` times along the batch axis; the rule set alone knows what they mean."""
    name = "base"
    parts = 1
    slots = 1
    needs_streams = False   # reads forward stream values (forces the split forward)

    def __init__(self, comp: Compilation):
        self.comp = comp
        self.b = comp.b

    # -- what every op rule may call --------------------------------------
    def seed(self, onehot: str) -> tuple:
        raise NotImplementedError

    def linear(self, ct: tuple, lin) -> tuple:
        raise NotImplementedError

    def relu(self, ct: tuple, node) -> tuple:
        raise NotImplementedError

    def maxpool(self, ct: tuple, win) -> tuple:
        raise NotImplementedError

    def sum2(self, ct: tuple, node, sign: int) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def smooth(self, ct: tuple, node, act, x: str) -> tuple:
        """A smooth or kinked activation y = φ(x) (dconnx/ops/smooth.py: `act` is its curvature split)."""
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError([(node.name or node.output[0], node.op_type,
                                   f"the '{self.name}' rule set has no rule for this activation")])

    def product(self, ct: tuple, node) -> tuple[tuple, tuple]:
        """y = a·b of two data tensors (broadcasting): the cotangents of a and of b."""
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError([(node.name or node.output[0], node.op_type,
                                   f"the '{self.name}' rule set has no rule for a product of two data tensors")])

    def product_gradient(self, ct: tuple, node) -> tuple[tuple, tuple]:
        """The gradient of y = a·b applied to a one-tensor cotangent: (g·b, g·a), each summed over
        the axes its factor was broadcast along."""
        u, v, y = node.input[0], node.input[1], node.output[0]
        return ((self.reduce_to(self.b.mul(ct[0], v), u, y),), (self.reduce_to(self.b.mul(ct[0], u), v, y),))

    def reduce_to(self, ct: str, like: str, out: str) -> str:
        """Sum a cotangent of `out` over the axes along which `like` was broadcast to it (the
        adjoint of broadcasting; operands of one rank, the batch axis never broadcast)."""
        view = self.comp.view
        out_shape, in_shape = view.shape(out), view.shape(like)
        axes = [k for k in range(1, len(out_shape)) if in_shape[k] == 1 and out_shape[k] != 1]
        return self.b.reduce_sum(ct, axes, keepdims=1) if axes else ct

    def activation_slope(self, node, act, x: str) -> str:
        """φ'(x) of a smooth activation, tiled to the cotangent's slots."""
        return self.tile(self.comp.cached(("dphi", node.output[0]), lambda: act.emit_dphi(self.b, x)))

    def inject(self, vector: str) -> tuple:
        """A cotangent that starts as `vector` at a hidden layer (relevance or gradient
        injection, as in the cosine-similarity-convergence sanity check)."""
        return self.seed(vector)

    def vector(self, ct: tuple) -> str:
        """The per-element quantity a map of this rule set sums over channels."""
        if len(ct) != 1:
            raise NotImplementedError(f"{self.name}: no single vector for a {len(ct)}-part cotangent")
        return ct[0]

    def shift(self, ct: tuple, factor: str) -> tuple:
        """α-shift at a shift point; rule sets without one pass the cotangent on."""
        return ct

    def move_multi(self, ct: tuple, pieces) -> list[tuple]:
        """A data-movement adjoint with several results (e.g. one Split for a Concat's
        inputs): `pieces(tensor) -> [names]` is applied to every part alike."""
        per_part = [pieces(part) for part in ct]
        return [tuple(parts) for parts in zip(*per_part)]

    # -- shared ------------------------------------------------------------
    def accumulate(self, cts: list[tuple], name: str) -> tuple:
        """Sum of the contributions that reach one tensor from its consumers."""
        if len(cts) == 1:
            return cts[0]
        return tuple(self.b.op("Sum", [c[i] for c in cts], hint=f"{name}::ct.{self.name}{i}")
                     for i in range(len(cts[0])))

    def tile(self, name: str) -> str:
        return self.comp.tiled(name, self.slots)

    def mask(self, node) -> str:
        """The Relu mask of this Relu node, tiled to the cotangent's slots. Taken from the
        Relu's output (y > 0 ⇔ x > 0) so that onnxruntime keeps its Conv+Relu fusion;
        ties="geq" needs x itself (x ≥ 0 is not visible in y)."""
        src = node.output[0] if self.comp.opts.ties == "strict" else node.input[0]
        return self.tile(self.comp.mask(src))
