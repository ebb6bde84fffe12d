"""DeepLIFT (Rescale rule) and Integrated Gradients: gradients taken through a second copy
of the forward that runs in the same graph (docs/baselines.md).

Both compare the input x with a reference x₀, the `reference` graph input (default: the
constant `Options.reference` everywhere, broadcast to x's shape):

* DeepLIFT: the forward is copied once, on x₀ (same weights, tensors renamed). The walk
  carries one cotangent, the multiplier m = ∂ᴰᴸf_k/∂t. Linear ops transpose with W as the
  gradient does; at every Relu the gradient's mask is replaced by the Rescale multiplier
  Δy/Δx (Δ = value on x minus value on x₀), and where |Δx| < 1e-10 by the gradient
  1[x > 0], Captum's `nonlinear`; MaxPool follows Captum's `maxpool`: with
  M = max(y, y₀), the window contributions (M − y₀) go to x's argmax and (y − M) to x₀'s
  argmax (summed where windows overlap), divided by Δx, the routed gradient where
  |Δx| < 1e-10. The map is (x − x₀) ⊙ m at the input. Σ of it = f_k(x) − f_k(x₀).
* Integrated Gradients: the forward is copied once, on the n scaled inputs
  x₀ + a_i (x − x₀) stacked along the batch axis (step i's batch after step i − 1's, as
  Captum stacks them). The walk carries the plain gradient of all n·B rows at once (the
  seed repeated n times, the copy's masks and argmax indices); at the input the n
  gradients are summed with the quadrature weights w_i and multiplied by x − x₀.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OptionError
from ..method_registry import METHODS
from .gradient import PlainGradient

EPS = 1e-10                     # Captum DeepLift's eps: |Δx| below it takes the gradient
IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def quadrature(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(points a_i in [0, 1], weights w_i) of Captum's `approximation_parameters(method)`."""
    if method not in IG_METHODS:
        raise OptionError(f"ig_method={method!r} is not one of {', '.join(IG_METHODS)}")
    if method == "gausslegendre":
        if n < 1:
            raise OptionError(f"ig_steps={n}: Gauss-Legendre needs at least 1 step")
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    if n < 2:
        raise OptionError(f"ig_steps={n}: the Riemann rules need at least 2 steps")
    weights = np.full(n, 1.0 / n)
    kind = method.split("_")[1]
    if kind == "trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0.0, 1.0, n), weights
    start, stop = {"left": (0.0, 1.0 - 1.0 / n), "right": (1.0 / n, 1.0),
                   "middle": (1.0 / (2 * n), 1.0 - 1.0 / (2 * n))}[kind]
    return np.linspace(start, stop, n), weights


def reference_input(comp) -> str:
    """x₀ with x's shape: the graph input `reference` (any shape that broadcasts to the input,
    e.g. [1, C, H, W] or [B, C, H, W]; default: all Options.reference), expanded to x."""
    def make():
        b = comp.b
        rank = comp.view.rank(comp.input_name)
        name = b.fresh("reference", exact=True)
        default = np.full([1] * rank, float(comp.opts.reference), dtype=b.float_dtype)
        b.initializers.append(numpy_helper.from_array(default, name))
        comp.new_inputs.append(onnx.helper.make_tensor_value_info(
            name, comp.float_type, [f"reference_{i}" for i in range(rank)]))
        comp.notes.append(f"deeplift/ig reference: the input '{name}' (default {comp.opts.reference} "
                          "everywhere)")
        return b.op("Expand", [name, b.op("Shape", [comp.input_name])], hint="dc/reference")
    return comp.cached("reference_input", make)


class ForwardCopy:
    """The canonical forward once more, on another input tensor: every node that depends on
    the data input is emitted again with renamed outputs (weights shared)."""

    def __init__(self, comp, source: str, tag: str):
        b = comp.b
        self.names = {comp.input_name: source}
        self.nodes = {}                               # original first output -> copied node
        for node in list(comp.model.graph.node):
            if not any(i in self.names for i in node.input if i):
                continue
            dup = onnx.NodeProto()
            dup.CopyFrom(node)
            del dup.input[:]
            dup.input.extend(self.names.get(i, i) for i in node.input)
            del dup.output[:]
            dup.output.extend(b.fresh(f"{o}::{tag}") if o else "" for o in node.output)
            dup.name = b.fresh(f"{node.name or node.output[0]}::{tag}#node")
            b.nodes.append(dup)
            self.names.update({o: c for o, c in zip(node.output, dup.output) if o})
            self.nodes[node.output[0]] = dup

    def __getitem__(self, tensor: str) -> str:
        return self.names[tensor]

    def window(self, win):
        """The MaxPool window `win` of the original graph, reading the copy's argmax."""
        w = copy.copy(win)
        w.node = self.nodes[win.y]
        w.x, w.y = self[win.x], self[win.y]
        return w


def _input_only(comp, rs_name: str) -> None:
    for h in comp.heads:
        if METHODS[h.method].ruleset == rs_name and h.tensor != comp.input_name:
            raise OptionError(f"{h.method} attributes to the input only (as Captum's DeepLift and "
                              f"IntegratedGradients do); got the layer {h.layer}")


class DeepLiftRescale(PlainGradient):
    """The DeepLIFT multipliers (Rescale rule) on the original graph and its copy on x₀."""
    name = "deeplift"

    def __init__(self, comp):
        super().__init__(comp)
        _input_only(comp, self.name)
        self.ref = comp.cached("forward_on_reference",
                               lambda: ForwardCopy(comp, reference_input(comp), "ref"))
        self._plain = {}       # MaxPool input -> (its multiplier, its plain gradient)

    def _delta(self, t: str) -> str:
        return self.comp.cached(("dl_delta", t), lambda: self.b.sub(t, self.ref[t], hint=f"{t}::delta"))

    def _small(self, delta: str) -> tuple[str, str]:
        """(|Δ| < eps, Δ with 1 where |Δ| < eps): the fallback mask and a safe divisor."""
        def make():
            b = self.b
            small = b.op("Less", [b.abs(delta), b.scalar(EPS)], hint=f"{delta}::small")
            return small, self.comp.where(small, b.scalar(1.0), delta)
        return self.comp.cached(("dl_small", delta), make)

    def relu(self, ct, node):
        b = self.b
        small, din = self._small(self._delta(node.input[0]))
        rescaled = b.div(b.mul(self.grad_output(ct[0], node), self._delta(node.output[0])), din,
                         hint=f"{node.output[0]}::rescale")
        return (self.comp.where(small, self.comp.where(self.mask(node), ct[0]), rescaled),)

    def grad_output(self, ct: str, node) -> str:
        """What the Rescale rule of this Relu multiplies: the multiplier at its output."""
        return ct

    def maxpool(self, ct, win):
        b = self.b
        g = ct[0]
        y, y0 = win.y, self.ref[win.y]
        top = b.op("Max", [y, y0], hint=f"{y}::xmax")
        moved = b.add(win.route(b.mul(g, b.sub(top, y0))),
                      self.ref.window(win).route(b.mul(g, b.sub(y, top))), hint=f"{win.x}::unpool")
        small, din = self._small(self._delta(win.x))
        plain = win.route(g)
        out = self.comp.where(small, plain, b.div(moved, din))
        self._plain[win.x] = (out, plain)
        return (out,)


class DeepLiftCaptumHooks(DeepLiftRescale):
    """DeepLIFT as Captum 0.9 computes it where a ReLU module feeds a MaxPool module directly.

    There the ReLU's backward hook receives the max pool's plain gradient as its grad_output
    (PyTorch runs the ReLU's output hook before the MaxPool's input hook replaces that
    gradient), while its grad_input, taken where |Δx| < eps, does carry the max-pool
    multiplier. Its sum equals f(x) − f(x₀) only where x₀'s pooled values sit at x's argmax
    (a constant reference); `deeplift` is the rule composed as defined (complete)."""
    name = "deeplift_captum"

    def grad_output(self, ct, node):
        y = node.output[0]
        if y not in self._plain:
            return ct
        mult, plain = self._plain[y]
        if len(self.comp.view.consumers.get(y, [])) == 1:
            return plain
        return self.b.add(self.b.sub(ct, mult), plain)


class IntegratedGradientsRules(PlainGradient):
    """The plain gradient of the forward copy on the n stacked scaled inputs."""
    name = "ig"

    def __init__(self, comp):
        super().__init__(comp)
        _input_only(comp, self.name)
        self.points, self.weights = quadrature(comp.opts.ig_method, int(comp.opts.ig_steps))
        self.n = len(self.points)
        self.slots = self.n
        b = comp.b
        x, x0 = comp.input_name, reference_input(comp)
        rank = comp.view.rank(x)
        a = b.const(self.points.reshape([-1] + [1] * (rank + 1)).astype(b.float_dtype), hint="ig_points")
        delta = b.unsqueeze(b.sub(x, x0, hint="dc/ig_delta"), [0])
        scaled = b.add(b.mul(a, delta), b.unsqueeze(x0, [0]), hint="dc/ig_scaled")
        stacked = b.op("Reshape", [scaled, b.concat([b.ints([-1]), b.shape_of(x, 1, rank)], 0)],
                       hint="dc/ig_inputs")
        self.delta = delta
        self.fwd = ForwardCopy(comp, stacked, "ig")

    def seed(self, onehot):
        return (self.tile(onehot),)

    def mask(self, node):
        src = node.output[0] if self.comp.opts.ties == "strict" else node.input[0]
        return self.comp.mask(self.fwd[src])

    def maxpool(self, ct, win):
        return (self.fwd.window(win).route(ct[0]),)

    def path_sum(self, ct: str) -> str:
        """Σ_i w_i ct_i over the n stacked steps, [n·B, ...] -> [B, ...]: one MatMul of the
        weights [1, n] with the cotangent seen as [n, B·...]."""
        b = self.b
        flat = b.reshape(ct, [self.n, -1], hint="dc/ig_steps")
        w = b.const(self.weights.reshape(1, -1).astype(b.float_dtype), hint="ig_weights")
        total = b.op("MatMul", [w, flat], hint="dc/ig_path_sum")
        return b.op("Reshape", [total, b.concat([b.ints([-1]), b.shape_of(ct, 1)], 0)], hint="dc/ig_sum")

    def vector(self, ct):
        """The path-weighted gradient Σ_i w_i ∇_t f at a tensor (what an injected vector becomes)."""
        return self.path_sum(ct[0])

    def attribution(self, ct) -> str:
        """(x − x₀) ⊙ Σ_i w_i ∇f_k(x₀ + a_i (x − x₀)), [B, ...]."""
        return self.b.mul(self.path_sum(ct[0]), self.b.squeeze(self.delta, [0]), hint="dc/ig")
