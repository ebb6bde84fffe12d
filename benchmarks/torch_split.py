"""The split method in plain PyTorch, written the straightforward way.

This is what a user porting the paper's code would write: the network is
traced once (``torch.fx``; BatchNorm folded into its Conv, as dconnx does),
and every tensor becomes two nonnegative streams ``(p, n)``:

* Conv / Linear, four products: ``P = W⁺p + W⁻n + b⁺``, ``N = W⁻p + W⁺n + b⁻``;
* Relu ("max" mode): ``(max(P, N), N)``, backward "standard"
  (``∂/∂P = m ∂/∂y_p``, ``∂/∂N = (1 − m) ∂/∂y_p + ∂/∂y_n``, ``m = 1[P > N]``);
* MaxPool ("wta"): both streams gathered at the argmax of ``p − n``
  (autograd scatters back with accumulation);
* Add: ``(p₁ + p₂, n₁ + n₂)``; average pooling / flatten / dropout: per stream;
* recentering ``(p − min(p, n), n − min(p, n))`` after every Conv/Linear/Relu/Add,
  identity backward;
* the α-shift at the inputs of every Conv/Linear/Relu/MaxPool/Add except the
  output layer, as an autograd Function on the cotangent pair.

The four sensitivities are two autograd passes over that graph (one for
``½ g_k``, one for ``½ h_k``), each with four transposed products per linear
op; they are read at the chosen layer (the input by default, or an fx node's
output). SplitLRP runs the
ε-rule through the same stream graph (custom backward of the linear ops, four
transposed products each) in one pass, seeded with ``g_k`` on the P stream and
``−h_k`` on the N stream (g-relevance minus h-relevance, linear in the seed).

Definitions: docs/method.md (§2-§4). ``benchmarks/run.py`` times this against
the converted ONNX graph; ``tests/test_bench_quick.py`` checks that it computes
the same maps as dconnx on the fixture model.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse


# ---------------------------------------------------------------- autograd pieces
class Recenter(torch.autograd.Function):
    """(p, n) -> (p - min(p, n), n - min(p, n)); identity backward."""

    @staticmethod
    def forward(ctx, p, n):
        m = torch.minimum(p, n)
        return p - m, n - m

    @staticmethod
    def backward(ctx, gp, gn):
        return gp, gn


class AlphaShift(torch.autograd.Function):
    """Identity forward; backward (dp - a(dp + dn), dn - a(dp + dn))."""

    @staticmethod
    def forward(ctx, p, n, alpha):
        ctx.alpha = alpha
        return p.view_as(p), n.view_as(n)

    @staticmethod
    def backward(ctx, gp, gn):
        s = ctx.alpha * (gp + gn)
        return gp - s, gn - s, None


class ReluMax(torch.autograd.Function):
    """(P, N) -> (max(P, N), N), "standard" backward with m = 1[P > N].

    The same rule routes SplitLRP relevance (winner takes all)."""

    @staticmethod
    def forward(ctx, P, N):
        m = P > N
        ctx.save_for_backward(m)
        return torch.maximum(P, N), N.view_as(N)

    @staticmethod
    def backward(ctx, gyp, gyn):
        (m,) = ctx.saved_tensors
        gP = torch.where(m, gyp, torch.zeros_like(gyp))
        gN = gyp - gP + gyn
        return gP, gN


def _transpose_product(op, g, w, in_shape):
    """Wᵀ g for a Conv2d / Linear op with weight w."""
    if op["type"] == "conv":
        return torch.nn.grad.conv2d_input(in_shape, w, g, op["stride"], op["padding"],
                                          op["dilation"], op["groups"])
    return g @ w


class LRPLinear(torch.autograd.Function):
    """Forward: the four-product split linear op. Backward: the ε-rule
    R_p = p ⊙ (W⁺ᵀ s_P + W⁻ᵀ s_N), R_n = n ⊙ (W⁻ᵀ s_P + W⁺ᵀ s_N), s = R / (z + ε)."""

    @staticmethod
    def forward(ctx, p, n, op, eps):
        P, N = split_linear(op, p, n)
        ctx.op, ctx.eps = op, eps
        ctx.save_for_backward(p, n, P, N)
        return P, N

    @staticmethod
    def backward(ctx, RP, RN):
        p, n, P, N = ctx.saved_tensors
        op = ctx.op
        sP, sN = RP / (P + ctx.eps), RN / (N + ctx.eps)
        wp, wn = op["wpos"], op["wneg"]
        cp = _transpose_product(op, sP, wp, p.shape) + _transpose_product(op, sN, wn, p.shape)
        cn = _transpose_product(op, sP, wn, p.shape) + _transpose_product(op, sN, wp, p.shape)
        return p * cp, n * cn, None, None


class LRPEpsilonSum(torch.autograd.Function):
    """A nonnegative linear map M applied to each stream (average pooling, Add),
    with the ε-rule backward R_x = x ⊙ Mᵀ(R / (M x + ε)) per stream."""

    @staticmethod
    def forward(ctx, fn, eps, *streams):
        # streams = (p1, n1, p2, n2, ...): M acts on the p's and on the n's
        ps, ns = streams[0::2], streams[1::2]
        P, N = fn(*ps), fn(*ns)
        ctx.fn, ctx.eps = fn, eps
        ctx.save_for_backward(*streams, P, N)
        return P, N

    @staticmethod
    def backward(ctx, RP, RN):
        *streams, P, N = ctx.saved_tensors
        ps, ns = streams[0::2], streams[1::2]
        sP, sN = RP / (P + ctx.eps), RN / (N + ctx.eps)
        with torch.enable_grad():
            leaves = [s.detach().requires_grad_(True) for s in ps]
            backP = torch.autograd.grad(ctx.fn(*leaves), leaves, sP)
            leaves = [s.detach().requires_grad_(True) for s in ns]
            backN = torch.autograd.grad(ctx.fn(*leaves), leaves, sN)
        out = []
        for p, n, bp, bn in zip(ps, ns, backP, backN):
            out += [p * bp, n * bn]
        return (None, None, *out)


def split_linear(op, p, n):
    """Four products: P = W⁺p + W⁻n + b⁺, N = W⁻p + W⁺n + b⁻."""
    wp, wn = op["wpos"], op["wneg"]
    if op["type"] == "conv":
        def lin(x, w):
            return F.conv2d(x, w, None, op["stride"], op["padding"], op["dilation"], op["groups"])
    else:
        def lin(x, w):
            return F.linear(x, w)
    P = lin(p, wp) + lin(n, wn)
    N = lin(p, wn) + lin(n, wp)
    if op["bpos"] is not None:
        shape = (1, -1, 1, 1) if op["type"] == "conv" else (1, -1)
        P = P + op["bpos"].view(shape)
        N = N + op["bneg"].view(shape)
    return P, N


def _is_identity_pool(m, x):
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
        return tuple(size) == tuple(x.shape[-2:])
    return False


def _gather(t, idx):
    return t.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


# ---------------------------------------------------------------- the split network
_SHIFT = {"linear", "relu", "maxpool", "add"}
_RECENTER = {"linear", "relu", "add"}


class TorchSplit:
    """SplitGrad / SplitCAM / SplitLRP of a ReLU CNN (nn.Module) in PyTorch.

    >>> ts = TorchSplit(model)                                # doctest: +SKIP
    >>> maps = ts(x, target, methods=("splitgrad", "splitcam"), alpha=0.35)
    """

    def __init__(self, model: nn.Module, layer: str | None = None, dtype=torch.float32):
        model = copy.deepcopy(model).eval().to(dtype)
        self.gm = fuse(model)                    # fx trace + Conv/BN folding
        self.dtype = dtype
        mods = dict(self.gm.named_modules())
        self.ops = {}                            # fx node name -> op description
        for node in self.gm.graph.nodes:
            self.ops[node.name] = self._describe(node, mods)
        self.layer = layer                       # fx node name whose output the maps are read at
        self.output_layers = self._output_layers()

    # -- graph analysis ----------------------------------------------------
    def _describe(self, node, mods):
        if node.op == "placeholder":
            return {"kind": "input"}
        if node.op == "output":
            return {"kind": "output"}
        if node.op == "call_module":
            m = mods[node.target]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                with torch.no_grad():
                    w = m.weight.detach()
                    b = None if m.bias is None else m.bias.detach()
                    op = {"kind": "linear", "type": "conv" if isinstance(m, nn.Conv2d) else "dense",
                          "wpos": F.relu(w), "wneg": F.relu(-w),
                          "bpos": None if b is None else F.relu(b),
                          "bneg": None if b is None else F.relu(-b)}
                if isinstance(m, nn.Conv2d):
                    if m.padding_mode != "zeros" or isinstance(m.padding, str):
                        raise NotImplementedError("Conv2d with non-zero or string padding")
                    op.update(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
                return op
            if isinstance(m, nn.ReLU):
                return {"kind": "relu"}
            if isinstance(m, nn.MaxPool2d):
                return {"kind": "maxpool", "pool": dict(kernel_size=m.kernel_size, stride=m.stride,
                                                        padding=m.padding, dilation=m.dilation,
                                                        ceil_mode=m.ceil_mode)}
            if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                return {"kind": "pool", "fn": m}
            if isinstance(m, (nn.Dropout, nn.Identity)):
                return {"kind": "move", "fn": lambda x: x}
            if isinstance(m, nn.Flatten):
                return {"kind": "move", "fn": m}
            if isinstance(m, nn.BatchNorm2d):
                raise NotImplementedError("BatchNorm2d that could not be folded into a Conv2d")
            raise NotImplementedError(f"module {type(m).__name__}")
        if node.op == "call_function":
            if node.target in (operator.add, torch.add, operator.iadd):
                return {"kind": "add"}
            if node.target in (torch.flatten,):
                args = node.args[1:]
                return {"kind": "move", "fn": lambda x, a=args: torch.flatten(x, *a)}
            if node.target is F.relu:
                return {"kind": "relu"}
            raise NotImplementedError(f"function {node.target}")
        if node.op == "call_method" and node.target in ("view", "reshape", "flatten"):
            args = node.args[1:]
            return {"kind": "move", "fn": lambda x, t=node.target, a=args: getattr(x, t)(*a)}
        raise NotImplementedError(f"{node.op} {node.target}")

    def _output_layers(self):
        """Shift-point nodes reached from the output through non-shift nodes: no α there."""
        out, seen = set(), set()
        stack = [n for n in self.gm.graph.nodes if n.op == "output"]
        while stack:
            node = stack.pop()
            for a in node.all_input_nodes:
                if a.name in seen:
                    continue
                seen.add(a.name)
                if self.ops[a.name]["kind"] in _SHIFT:
                    out.add(a.name)
                else:
                    stack.append(a)
        return out

    # -- the split forward -------------------------------------------------
    def _forward(self, x, alpha, lrp, eps):
        """Streams of every node, built on autograd; returns (env, (p0, n0), output pair)."""
        env = {}
        p0 = F.relu(x).requires_grad_(True)
        n0 = F.relu(-x).requires_grad_(True)
        for node in self.gm.graph.nodes:
            op = self.ops[node.name]
            kind = op["kind"]
            if kind == "input":
                env[node.name] = (p0, n0)
                continue
            if kind == "output":
                return env, (p0, n0), env[node.args[0].name]
            ins = [env[a.name] for a in node.args if isinstance(a, fx.Node)]
            if not lrp and kind in _SHIFT and node.name not in self.output_layers:
                ins = [AlphaShift.apply(p, n, alpha) for p, n in ins]
            (p, n) = ins[0]
            if kind == "linear":
                P, N = LRPLinear.apply(p, n, op, eps) if lrp else split_linear(op, p, n)
            elif kind == "relu":
                P, N = ReluMax.apply(p, n)
            elif kind == "maxpool":
                with torch.no_grad():
                    idx = F.max_pool2d(p - n, return_indices=True, **op["pool"])[1]
                P, N = _gather(p, idx), _gather(n, idx)
            elif kind == "add":
                (p2, n2) = ins[1]
                if lrp:
                    P, N = LRPEpsilonSum.apply(operator.add, eps, p, n, p2, n2)
                else:
                    P, N = p + p2, n + n2
            elif kind == "pool" and _is_identity_pool(op["fn"], p):
                P, N = p, n                       # VGG's 7x7 adaptive pool at 224x224
            elif kind == "pool" and lrp:
                P, N = LRPEpsilonSum.apply(op["fn"], eps, p, n)
            else:   # pool, move
                P, N = op["fn"](p), op["fn"](n)
            if kind in _RECENTER:
                P, N = Recenter.apply(P, N)
            env[node.name] = (P, N)
        raise AssertionError("graph without output")

    # -- the maps ----------------------------------------------------------
    def __call__(self, x, target=None, methods=("splitgrad",), alpha: float = 0.35,
                 eps: float = 1e-6) -> dict:
        """Maps [B, H, W] by method name; `target` None = the argmax of the logits."""
        x = torch.as_tensor(x, dtype=self.dtype)
        out = {}
        sens_methods = [m for m in methods if m in ("splitgrad", "splitcam")]
        if sens_methods:
            out.update(self._sensitivity_maps(x, target, sens_methods, alpha))
        if "splitlrp" in methods:
            out["splitlrp"] = self._lrp_map(x, target, eps)
        return out

    def _target(self, target, g, h):
        if target is None:
            return (g - h).argmax(1)
        t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        return t.expand(g.shape[0]) if t.numel() == 1 else t

    def _at_layer(self, env, inputs):
        return inputs if self.layer is None else env[self.layer]

    def _upsample(self, m, size):
        if m.shape[-2:] == size:
            return m
        return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def _sensitivity_maps(self, x, target, methods, alpha):
        with torch.enable_grad():
            env, inputs, (g, h) = self._forward(x, alpha, lrp=False, eps=0.0)
            tgt = self._target(target, g.detach(), h.detach())
            pL, nL = self._at_layer(env, inputs)
            sel = lambda z: 0.5 * z.gather(1, tgt[:, None]).sum()   # noqa: E731
            # δpp, δnp: one backward pass for ½g_k; δpn, δnn: one for ½h_k
            dpp, dnp = torch.autograd.grad(sel(g), [pL, nL], retain_graph=True)
            dpn, dnn = torch.autograd.grad(sel(h), [pL, nL])
        s = dpp + dnn
        out = {}
        if "splitgrad" in methods:
            out["splitgrad"] = self._upsample(s.sum(1), x.shape[-2:])
        if "splitcam" in methods:
            cam = F.relu((F.relu(s) * (pL.detach() + nL.detach())).sum(1))
            out["splitcam"] = self._upsample(cam, x.shape[-2:])
        return out

    def _lrp_map(self, x, target, eps):
        with torch.enable_grad():
            env, inputs, (g, h) = self._forward(x, 0.0, lrp=True, eps=eps)
            tgt = self._target(target, g.detach(), h.detach())
            pL, nL = self._at_layer(env, inputs)
            onehot = torch.zeros_like(g).scatter_(1, tgt[:, None], 1.0)
            Rp, Rn = torch.autograd.grad((g, h), [pL, nL],
                                         (g.detach() * onehot, -h.detach() * onehot))
        return self._upsample((Rp + Rn).sum(1), x.shape[-2:])
