"""Independent float64 reference of the DC decomposition (docs/method.md).

Written from docs/method.md only (not from dconnx/ or passes/). It works on a
torch ``nn.Module`` (traced with ``torch.fx.symbolic_trace``), turns it into
the *canonical* op list of docs/method.md §1, and evaluates on that list

* the plain forward and autograd gradient of the (BN-folded) model,
* the split forward (four-product form) with optional recentering,
* the four sensitivities by torch autograd over the split network, with custom
  autograd Functions where the backward is not the true derivative
  (recentering, the Relu backward modes, the alpha-shift),
* SplitLRP by an explicit reverse walk with the epsilon rule,
* the heads SplitGrad / SplitCAM / SplitLRP.

Usage::

    from reference import dc_reference as ref
    res = ref.run(model, x, alpha=0.35, layers=[5, "5:out", "layer1_0_relu"])
    m = ref.splitgrad(res, 5)          # [B, h, w]
    m = ref.upsample(m, x.shape[-2:])  # [B, H, W]

Result (``DCResult``, float64): ``logits`` f [B, K]; ``g``, ``h`` (output streams);
``target`` LongTensor [B]; per kept key: ``streams`` (p, n) as consumed (after
recentering), ``pre_streams`` (P, N) of the producing op before recentering,
``sens`` (dpp, dnp, dpn, dnn), ``relevance`` (Rg_p, Rg_n, Rh_p, Rh_n), ``grad``
(plain autograd of f_target of the canonical / BN-folded model), ``acts`` (the
plain activation), ``lrp_sums`` (total g- and h-relevance per sample); and
``graph`` (the CanonicalGraph), ``keys`` (key -> tensor id), ``alphas`` (alpha
used at each shifted op), ``options``.

The sensitivities at a tensor are the partial derivatives (g: seeded with
0.5*g_k, h: 0.5*h_k) with respect to that tensor's streams as independent
variables, summed over all its consumers, each consumer's alpha-shift applied.
They are the same before and after recentering (identity backward).

Layer keys: "input"; an int N or "N" (tensor entering op N of the canonical
chain, counted like torchvision ``vgg16.features[N]``: every canonical op
counts, removed ops (Dropout, Identity, folded BN, identity adaptive pooling)
do not; defined while each op has a single data input and its input a single
consumer); "N:out" (the tensor leaving op N); an fx node name; a module
qualified name (if called once); a canonical tensor name (``graph.tensor_names``,
e.g. "r6.relu_lo" for the pieces of a decomposed op); or layers="all".

Canonical op kinds (docs/method.md §1):

==========  ===================================================  =====  ========
kind        ops                                                  shift  recenter
==========  ===================================================  =====  ========
linear      Conv2d, Linear, BatchNorm (folded or per-channel)    yes    yes
relu        ReLU (module / functional / method)                  yes    yes
maxpool     MaxPool2d / F.max_pool2d                             yes    no
add, sub    two data tensors                                     yes    yes
smooth      Sigmoid, Tanh, Softplus, ELU, SELU, CELU, GELU (both   yes    yes
            forms), SiLU, Mish, Hardswish, Hardsigmoid (module /
            functional / method): the curvature split
product     product of two data tensors (broadcasting): polariz.  yes    yes
affine      add/sub/mul/div/neg with a constant                  no     no
pool        AvgPool2d, AdaptiveAvgPool2d, mean/sum over dims     no     no
move        flatten/view/reshape/cat/permute/squeeze/getitem     no     no
==========  ===================================================  =====  ========

Removed: Dropout, Identity, identity AdaptiveAvgPool2d, contiguous/clone,
and a trailing Softmax/LogSoftmax (the maps explain its input).
Clip / ReLU6 / Hardtanh(a, b): ``relu(x - a) - relu(x - b) + a`` (for a = 0:
Relu, constant affine ``x - b``, Relu, Sub). LeakyReLU(s): ``s*x + (1 - s)*relu(x)``
(Relu, constant affines, Add).

Smooth activations (docs/method.md "Beyond ReLU"): φ = φ₁ − φ₂ with φ₁ = φ on its
convex interval [lo, hi] continued by the tangent slopes outside; each part q with
slopes in [m, M] and c₀ = inf (q − m·u) gives P_q = m⁺P + m⁻N + (q(x) − m·x − c₀) +
(M − m)N + c₀⁺, N_q = m⁺N + m⁻P + (M − m)N + c₀⁻, and P' = P₁ + N₂, N' = N₁ + P₂.
The constants are derived here from φ (class ``Smooth``), not taken from the compiler.
Products x·y, x = P − N, y = Q − R: P' = ½[(P+Q)² + (N+R)²], N' = ½[(P+R)² + (N+Q)²].
SplitLRP passes relevance through a smooth activation unchanged on each stream; through
a product by the epsilon rule on the four squares, each square's share going to its two
summands in proportion to their values (summed over broadcast axes).
"""
from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "UnsupportedModelError",
    "Op",
    "CanonicalGraph",
    "DCResult",
    "canonicalize",
    "run",
    "splitgrad",
    "splitcam",
    "splitlrp",
    "upsample",
    "channel_sum",
    "SHIFT_KINDS",
    "RECENTER_KINDS",
]

SHIFT_KINDS = frozenset({"linear", "relu", "maxpool", "add", "sub", "smooth", "product"})
RECENTER_KINDS = frozenset({"linear", "relu", "add", "sub", "smooth", "product"})
DTYPE = torch.float64


class UnsupportedModelError(NotImplementedError):
    """Raised for an op (or op configuration) the reference does not support."""


# ----------------------------------------------------------------------------
# canonical graph
# ----------------------------------------------------------------------------


@dataclass
class Op:
    index: int
    kind: str  # linear | affine | relu | maxpool | add | sub | pool | move | smooth | product
    inputs: list  # tensor ids
    out: int  # tensor id
    name: str  # canonical name of the output tensor
    origin: str  # fx node that produced it
    weight: torch.Tensor | None = None  # linear / affine: the weight handed to `lin`
    bias: torch.Tensor | None = None  # linear / affine: broadcastable bias (or None)
    lin: Callable | None = None  # linear / affine: bias-free linear map lin(x, weight)
    lin_t: Callable | None = None  # its transpose lin_t(c, weight, input_shape)
    fn: Callable | None = None  # pool / move: nonnegative linear map fn(*xs)
    pool: dict | None = None  # maxpool: kernel_size, stride, padding, dilation, ceil_mode
    shift: bool = False  # alpha-shift applied at this op's data inputs
    output_layer: bool = False  # shift point whose shift is skipped
    desc: str = ""
    act: Any = None  # smooth: the Smooth activation (curvature split)

    @property
    def wpos(self):
        if getattr(self, "_wpos", None) is None:
            self._wpos = _pos(self.weight)
        return self._wpos

    @property
    def wneg(self):
        if getattr(self, "_wneg", None) is None:
            self._wneg = _neg(self.weight)
        return self._wneg

    @property
    def shift_point(self) -> bool:
        return self.kind in SHIFT_KINDS

    @property
    def recenter_point(self) -> bool:
        return self.kind in RECENTER_KINDS


@dataclass
class CanonicalGraph:
    ops: list  # list[Op], topological
    output: int  # tensor id of the explained output (logits)
    tensor_names: list  # tensor id -> canonical name ("input" for 0)
    names: dict  # fx node name / canonical name -> tensor id
    targets: dict  # module qualified name -> list of tensor ids
    chain: list  # op indices of the canonical feature chain from the input
    shapes: dict  # tensor id -> shape (for the traced x)
    producer: dict = field(default_factory=dict)  # tensor id -> op index
    consumers: dict = field(default_factory=dict)  # tensor id -> list of op indices

    def resolve(self, key) -> int:
        """Tensor id for a layer key (see module docstring of run())."""
        if isinstance(key, bool):
            raise KeyError(f"bad layer key {key!r}")
        if key == "input":
            return 0
        if isinstance(key, int):
            return self._chain_tensor(key, out=False)
        if isinstance(key, str):
            if re.fullmatch(r"\d+", key):
                return self._chain_tensor(int(key), out=False)
            m = re.fullmatch(r"(\d+):out", key)
            if m:
                return self._chain_tensor(int(m.group(1)), out=True)
            if key in self.names:
                return self.names[key]
            if key in self.targets:
                tids = sorted(set(self.targets[key]))
                if len(tids) == 1:
                    return tids[0]
                raise KeyError(
                    f"module {key!r} is called several times; use an fx node name "
                    f"({[self.tensor_names[t] for t in tids]})"
                )
        raise KeyError(f"unknown layer key {key!r}; known names: {sorted(self.names)}")

    def _chain_tensor(self, n: int, out: bool) -> int:
        if n < 0:
            raise KeyError(f"negative layer index {n}")
        if n == 0 and not out:
            return 0
        if n >= len(self.chain):
            raise KeyError(
                f"layer index {n}{':out' if out else ''} is beyond the canonical chain "
                f"from the input (chain has {len(self.chain)} ops: "
                f"{[self.ops[i].name for i in self.chain]}); use a tensor name"
            )
        op = self.ops[self.chain[n]]
        return op.out if out else op.inputs[0]

    def describe(self) -> str:
        lines = []
        for op in self.ops:
            ins = ", ".join(self.tensor_names[i] for i in op.inputs)
            flags = ("S" if op.shift else ("s" if op.shift_point else "-")) + (
                "R" if op.recenter_point else "-"
            )
            ch = self.chain.index(op.index) if op.index in self.chain else ""
            lines.append(
                f"{op.index:3d} {ch!s:>3} {flags} {op.kind:8s} {op.name:30s} <- {ins}  {op.desc}"
            )
        return "\n".join(lines)


def _pos(t):
    return t.clamp(min=0) if torch.is_tensor(t) else max(t, 0.0)


def _neg(t):
    return (-t).clamp(min=0) if torch.is_tensor(t) else max(-t, 0.0)


def _conv_lin(stride, padding, dilation, groups, nd=2):
    conv = {1: F.conv1d, 2: F.conv2d}[nd]
    conv_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input}[nd]

    def lin(x, w):
        return conv(x, w, None, stride, padding, dilation, groups)

    def lin_t(c, w, in_shape):  # W^T c, the transposed convolution
        if isinstance(padding, str):
            return _vjp_lin_t(lin, c, w, in_shape)
        return conv_input(in_shape, w, c, stride, padding, dilation, groups)

    return lin, lin_t


def _depthwise_lin(stride, padding, dilation):
    """A depthwise 2-D convolution by unfold (torch's float64 depthwise kernel is slow on CPU)."""
    def lin(x, w):
        n, c, h, wd = x.shape
        mult, (k0, k1) = w.shape[0] // c, w.shape[2:]
        cols = F.unfold(x, (k0, k1), dilation=dilation, padding=padding, stride=stride)
        y = (cols.view(n, c, 1, k0 * k1, -1) * w.reshape(1, c, mult, k0 * k1, 1)).sum(3)
        oh = (h + 2 * padding[0] - dilation[0] * (k0 - 1) - 1) // stride[0] + 1
        return y.reshape(n, c * mult, oh, -1)

    def lin_t(c, w, in_shape):
        return _vjp_lin_t(lin, c, w, in_shape)

    return lin, lin_t


def _vjp_lin_t(lin, c, w, in_shape):
    with torch.enable_grad():
        z = torch.zeros(in_shape, dtype=c.dtype, requires_grad=True)
        (gz,) = torch.autograd.grad(lin(z, w), z, c)
    return gz


def _dense_lin(x, w):
    return F.linear(x, w)


def _dense_lin_t(c, w, in_shape):
    return c @ w


def _scale_lin(x, w):
    return x * w


def _scale_lin_t(c, w, in_shape):
    return (c * w).sum_to_size(in_shape)


def _chan_shape(ndim: int, c: int):
    s = [1] * ndim
    s[1] = c
    return s


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Builder:
    """Walks an fx graph and emits canonical ops (with a concrete plain forward)."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor, fold_bn: bool):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.fold_bn = fold_bn
        self.ops: list[Op] = []
        self.vals: dict[int, torch.Tensor] = {}  # tensor id -> plain value
        self.tensor_names = ["input"]
        self.names: dict[str, int] = {"input": 0}
        self.targets: dict[str, list] = {}
        self.env: dict[fx.Node, Any] = {}
        self.folded: dict[fx.Node, fx.Node] = {}  # bn node -> conv node
        self.output: int | None = None
        self.x = x

    # -- helpers -------------------------------------------------------------
    def is_data(self, v) -> bool:
        return isinstance(v, _T)

    def cval(self, a):
        """Concrete value of an argument (data tensors are not allowed)."""
        if isinstance(a, fx.Node):
            v = self.env[a]
            if isinstance(v, _T):
                raise UnsupportedModelError(
                    f"data tensor {a.name!r} used where a constant is required"
                )
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self.cval(b) for b in a)
        if isinstance(a, dict):
            return {k: self.cval(b) for k, b in a.items()}
        if isinstance(a, slice):
            return slice(self.cval(a.start), self.cval(a.stop), self.cval(a.step))
        return a

    def arg(self, a):
        """Data handle or concrete value."""
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(b) for b in a)
        return a

    def emit(self, kind, inputs, node, suffix="", **kw) -> "_T":
        tid = len(self.tensor_names)
        name = node.name + suffix
        op = Op(index=len(self.ops), kind=kind, inputs=list(inputs), out=tid, name=name,
                origin=node.name, **kw)
        self.ops.append(op)
        self.tensor_names.append(name)
        self.names[name] = tid
        self.vals[tid] = plain_op(op, [self.vals[i] for i in inputs])
        return _T(tid)

    def bind(self, node: fx.Node, value):
        self.env[node] = value
        if isinstance(value, _T):
            self.names.setdefault(node.name, value.tid)
            if node.op == "call_module":
                self.targets.setdefault(node.target, []).append(value.tid)

    # -- op emitters ---------------------------------------------------------
    def linear_conv(self, node, conv: nn.Conv2d, src: _T, bn: nn.BatchNorm2d | None):
        if conv.padding_mode != "zeros":
            raise UnsupportedModelError(f"{node.name}: padding_mode={conv.padding_mode!r}")
        w = conv.weight.detach().to(DTYPE)
        b = conv.bias.detach().to(DTYPE) if conv.bias is not None else torch.zeros(w.shape[0], dtype=DTYPE)
        desc = f"conv{tuple(w.shape)} s{conv.stride} p{conv.padding} d{conv.dilation} g{conv.groups}"
        nd = w.dim() - 2
        if bn is not None:
            s, t = _bn_affine(bn)
            w = w * s.view(-1, *[1] * (nd + 1))
            b = b * s + t
            desc += " +bn(folded)"
        if nd == 2 and conv.groups > 1 and conv.groups == conv.in_channels and not isinstance(conv.padding, str):
            lin, lin_t = _depthwise_lin(_pair(conv.stride), _pair(conv.padding), _pair(conv.dilation))
        else:
            lin, lin_t = _conv_lin(conv.stride, conv.padding, conv.dilation, conv.groups, nd)
        return self.emit("linear", [src.tid], node, weight=w, bias=b.view(1, -1, *[1] * nd),
                         lin=lin, lin_t=lin_t, desc=desc)

    def linear_dense(self, node, lin: nn.Linear, src: _T, bn: nn.BatchNorm1d | None):
        w = lin.weight.detach().to(DTYPE)
        b = lin.bias.detach().to(DTYPE) if lin.bias is not None else torch.zeros(w.shape[0], dtype=DTYPE)
        desc = f"linear{tuple(w.shape)}"
        if bn is not None:
            s, t = _bn_affine(bn)
            w = w * s.view(-1, 1)
            b = b * s + t
            desc += " +bn(folded)"
        return self.emit("linear", [src.tid], node, weight=w, bias=b, lin=_dense_lin,
                         lin_t=_dense_lin_t, desc=desc)

    def batchnorm(self, node, bn, src: _T):
        s, t = _bn_affine(bn)
        shape = _chan_shape(self.vals[src.tid].dim(), s.numel())
        return self.emit("linear", [src.tid], node, weight=s.view(shape), bias=t.view(shape),
                         lin=_scale_lin, lin_t=_scale_lin_t, desc="batchnorm (per-channel affine)")

    def affine(self, node, src: _T, c, b, suffix=""):
        c = torch.as_tensor(c, dtype=DTYPE)
        b = None if b is None else torch.as_tensor(b, dtype=DTYPE)
        return self.emit("affine", [src.tid], node, suffix=suffix, weight=c, bias=b,
                         lin=_scale_lin, lin_t=_scale_lin_t, desc=f"x*{_short(c)} + {_short(b)}")

    def clip(self, node, src: _T, lo, hi):
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        if not lo < hi:
            raise UnsupportedModelError(f"{node.name}: clip with min >= max")
        if math.isinf(lo) and math.isinf(hi):
            return src
        if math.isinf(lo):  # min(x, hi) = x - relu(x - hi)
            t = self.affine(node, src, 1.0, -hi, suffix=".shift_hi")
            r = self.emit("relu", [t.tid], node, suffix=".relu_hi")
            return self.emit("sub", [src.tid, r.tid], node, desc="x - relu(x - hi)")
        # relu(x - lo) - relu(x - hi) + lo
        t1 = src if lo == 0 else self.affine(node, src, 1.0, -lo, suffix=".shift_lo")
        last_suffix = "" if (math.isinf(hi) and lo == 0) else ".relu_lo"
        r1 = self.emit("relu", [t1.tid], node, suffix=last_suffix)
        if math.isinf(hi):
            return r1 if lo == 0 else self.affine(node, r1, 1.0, lo)
        t2 = self.affine(node, src, 1.0, -hi, suffix=".shift_hi")
        r2 = self.emit("relu", [t2.tid], node, suffix=".relu_hi")
        s = self.emit("sub", [r1.tid, r2.tid], node, suffix="" if lo == 0 else ".sub",
                      desc=f"clip({lo}, {hi})")
        return s if lo == 0 else self.affine(node, s, 1.0, lo)

    def leaky(self, node, src: _T, slope):
        """LeakyRelu(s): s*x + (1 - s)*Relu(x) (Relu, two constant affines, Add); PReLU with a tensor s."""
        slope = slope if torch.is_tensor(slope) else float(slope)
        r = self.emit("relu", [src.tid], node, suffix=".relu")
        a = self.affine(node, r, 1.0 - slope, None, suffix=".scale_relu")
        b = self.affine(node, src, slope, None, suffix=".scale_x")
        return self.emit("add", [b.tid, a.tid], node, desc=f"leaky_relu({slope})")

    def maxpool(self, node, src: _T, kernel_size, stride=None, padding=0, dilation=1,
                ceil_mode=False, return_indices=False):
        if return_indices:
            raise UnsupportedModelError(f"{node.name}: max_pool2d with return_indices")
        if self.vals[src.tid].dim() != 4:
            raise UnsupportedModelError(f"{node.name}: max pooling needs a 4-D tensor")
        k = _pair(kernel_size)
        st = k if (stride is None or stride == [] or stride == ()) else _pair(stride)
        params = dict(kernel_size=k, stride=st, padding=_pair(padding),
                      dilation=_pair(dilation), ceil_mode=bool(ceil_mode))
        if k == st == (1, 1) and params["padding"] == (0, 0):
            return src  # 1x1 window, stride 1, no padding: removed (docs/method.md §1)
        return self.emit("maxpool", [src.tid], node, pool=params, desc=str(params))

    def nonneg(self, kind, node, srcs, fn, desc="", suffix=""):
        return self.emit(kind, [s.tid for s in srcs], node, suffix=suffix, fn=fn, desc=desc)

    def two(self, kind, node, a, b):
        return self.emit(kind, [a.tid, b.tid], node)

    # -- main ----------------------------------------------------------------
    def build(self) -> CanonicalGraph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError("exactly one model input is supported")
        self.vals[0] = self.x
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.bind(node, _T(0))
                self.names[node.name] = 0
            elif node.op == "get_attr":
                v = self.gm
                for part in node.target.split("."):
                    v = getattr(v, part)
                if torch.is_tensor(v):
                    v = v.detach().to(DTYPE) if v.is_floating_point() else v.detach()
                self.bind(node, v)
            elif node.op == "call_module":
                self.bind(node, self.call_module(node))
            elif node.op in ("call_function", "call_method"):
                self.bind(node, self.call_function(node))
            elif node.op == "output":
                out = node.args[0]
                if isinstance(out, (tuple, list)) and len(out) == 1:
                    out = out[0]
                v = self.env.get(out) if isinstance(out, fx.Node) else None
                if not isinstance(v, _T):
                    raise UnsupportedModelError("the model must return one data tensor (logits)")
                if self.vals[v.tid].dim() != 2:
                    raise UnsupportedModelError(
                        f"the explained output must be [batch, classes], got {tuple(self.vals[v.tid].shape)}"
                    )
                self.output = v.tid
        return self.finish()

    def call_module(self, node):
        m = self.modules[node.target]
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(a) for k, a in node.kwargs.items()}
        src = args[0] if args else kwargs.get("input")
        if not isinstance(src, _T):
            raise UnsupportedModelError(f"{node.name}: module applied to a constant")
        if len(args) + len(kwargs) != 1:
            raise UnsupportedModelError(f"{node.name}: module called with extra arguments")
        if isinstance(m, nn.Conv2d):
            return self.linear_conv(node, m, src, self.bn_to_fold(node, nn.BatchNorm2d))
        if isinstance(m, nn.Conv1d):
            return self.linear_conv(node, m, src, self.bn_to_fold(node, nn.BatchNorm1d))
        if isinstance(m, nn.Linear):
            bn = self.bn_to_fold(node, nn.BatchNorm1d)
            if bn is not None and self.vals[src.tid].dim() != 2:
                bn = None
            return self.linear_dense(node, m, src, bn)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if node in self.folded:
                return src  # already folded into the producer
            return self.batchnorm(node, m, src)
        if isinstance(m, nn.ReLU):
            return self.emit("relu", [src.tid], node)
        if type(m) in _SMOOTH_MODULES:
            return self.smooth(node, src, _SMOOTH_MODULES[type(m)], **_module_params(m))
        if isinstance(m, nn.PReLU):
            w = m.weight.detach().to(DTYPE)
            dims = self.vals[src.tid].dim()
            slope = w.view(-1, *[1] * (dims - 2)) if w.numel() > 1 else w.reshape(())
            return self.leaky(node, src, slope)
        if isinstance(m, nn.ReLU6):
            return self.clip(node, src, 0.0, 6.0)
        if isinstance(m, nn.Hardtanh):
            return self.clip(node, src, m.min_val, m.max_val)
        if isinstance(m, nn.LeakyReLU):
            return self.leaky(node, src, m.negative_slope)
        if isinstance(m, nn.MaxPool2d):
            return self.maxpool(node, src, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.ceil_mode, m.return_indices)
        if isinstance(m, nn.AvgPool2d):
            return self.avgpool(node, src, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                m.count_include_pad, m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive(node, src, m.output_size)
        if isinstance(m, nn.Flatten):
            a, b = m.start_dim, m.end_dim
            return self.nonneg("move", node, [src], lambda t: torch.flatten(t, a, b), "flatten")
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
            return src
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, src)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            return self.linear_conv_transpose(node, m, src)
        if isinstance(m, nn.Upsample):
            size, scale, mode, ac = m.size, m.scale_factor, m.mode, m.align_corners
            # nearest copies each value: data movement (relevance moved exactly); linear: a pooling
            return self.nonneg("move" if mode == "nearest" else "pool", node, [src],
                               lambda t: F.interpolate(t, size, scale, mode, ac), f"interpolate {mode}")
        if isinstance(m, nn.AdaptiveMaxPool2d):
            if _pair(m.output_size) != (1, 1):
                raise UnsupportedModelError(f"{node.name}: adaptive max pool to {m.output_size}")
            return self.maxpool(node, src, tuple(self.vals[src.tid].shape[2:]))
        raise UnsupportedModelError(f"{node.name}: module {type(m).__name__} is not supported")

    def linear_conv_transpose(self, node, m: nn.ConvTranspose2d, src: _T):
        """A transposed convolution: linear with its weight; W^T is the convolution it transposes."""
        w = m.weight.detach().to(DTYPE)
        b = m.bias.detach().to(DTYPE) if m.bias is not None else torch.zeros(w.shape[1] * m.groups, dtype=DTYPE)
        st, pd, op, g, dl = m.stride, m.padding, m.output_padding, m.groups, m.dilation
        conv_t = F.conv_transpose1d if isinstance(m, nn.ConvTranspose1d) else F.conv_transpose2d

        def lin(x, w):
            return conv_t(x, w, None, st, pd, op, g, dl)

        def lin_t(c, w, in_shape):
            return _vjp_lin_t(lin, c, w, in_shape)

        bias = b.view(1, -1, *([1] * (w.dim() - 2)))
        return self.emit("linear", [src.tid], node, weight=w, bias=bias, lin=lin, lin_t=lin_t,
                         desc=f"conv_transpose{tuple(w.shape)} s{st} p{pd} op{op} d{dl} g{g}")

    def fused_gate(self, node, a: _T, b: _T):
        """x·sigmoid(x) → SiLU, x·tanh(softplus(x)) → Mish, x·hardsigmoid(x) → HardSwish: one
        activation (docs/method.md: exported subgraphs are converted as one activation) when the
        gate's ops are the last ones emitted and feed only this product; else None."""
        for x, gate in ((a, b), (b, a)):
            chain = []           # the gate's ops, last first, back to x
            t = gate
            while t.tid and len(chain) < 2:
                op = self.ops[-1 - len(chain)] if len(self.ops) > len(chain) else None
                if op is None or op.out != t.tid or op.kind != "smooth":
                    break
                chain.append(op)
                if op.inputs == [x.tid]:
                    break
                t = _T(op.inputs[0])
            kinds = [op.act.name for op in chain]
            fused = {("sigmoid",): "silu", ("tanh", "softplus"): "mish",
                     ("hardsigmoid",): "hardswish"}.get(tuple(kinds))
            if fused is None or chain[-1].inputs != [x.tid] or (fused == "mish" and chain[1].act.params != {}):
                continue
            if chain[0].act.params:
                continue
            # the gate's tensors are read by nothing but the product (fx users)
            users = {}
            for nd, v in self.env.items():
                if isinstance(v, _T):
                    users.setdefault(v.tid, []).append(nd)
            if any(len(nd.users) != 1 for op in chain for nd in users.get(op.out, [])):
                continue
            for op in chain:     # un-emit the gate (the last ops), then emit the fused activation
                self.ops.pop()
                tid = op.out
                self.tensor_names.pop()
                self.vals.pop(tid)
                for k in [k for k, v in self.names.items() if v == tid]:
                    del self.names[k]
                for k in list(self.targets):
                    self.targets[k] = [v for v in self.targets[k] if v != tid]
                    if not self.targets[k]:
                        del self.targets[k]
            return self.smooth(node, x, fused)
        return None

    def smooth(self, node, src: _T, kind: str, **params):
        act = smooth_activation(kind, **params)
        return self.emit("smooth", [src.tid], node, act=act,
                         desc=f"{kind}{params or ''} convex on [{act.lo:.6g}, {act.hi:.6g}]")

    def max2(self, node, a: _T, b: _T, is_min: bool):
        """max(a, b) = b + relu(a − b); min(a, b) = a − relu(a − b)."""
        d = self.emit("sub", [a.tid, b.tid], node, suffix=".diff")
        r = self.emit("relu", [d.tid], node, suffix=".relu")
        if is_min:
            return self.emit("sub", [a.tid, r.tid], node, desc="a - relu(a - b)")
        return self.emit("add", [r.tid, b.tid], node, desc="b + relu(a - b)")

    def bn_to_fold(self, node, bn_type):
        if not self.fold_bn or len(node.users) != 1:
            return None
        (user,) = node.users
        prev = node
        # Dropout/Identity between them are removed first (docs/method.md §1): fold through them
        while user.op == "call_module" and isinstance(self.modules[user.target], (nn.Dropout, nn.Identity)) \
                and len(user.users) == 1:
            prev, (user,) = user, user.users
        if user.op != "call_module":
            return None
        m = self.modules[user.target]
        if type(m) is not bn_type or user.args[0] is not prev or len(user.args) != 1:
            return None
        self.folded[user] = node
        return m

    def softmax(self, node, src):
        users = list(node.users)
        if not (len(users) == 1 and users[0].op == "output"):
            raise UnsupportedModelError(f"{node.name}: softmax is only supported at the output")
        return src  # the maps explain its input (the logits)

    def avgpool(self, node, src, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
        k = _pair(kernel_size)
        st = k if (stride is None or stride == [] or stride == ()) else _pair(stride)
        pd = _pair(padding)
        if k == st == (1, 1) and pd == (0, 0) and divisor_override in (None, 1):
            return src  # 1x1 window, stride 1, no padding: removed (docs/method.md §1)

        def fn(t):
            return F.avg_pool2d(t, k, st, pd, ceil_mode, count_include_pad, divisor_override)

        return self.nonneg("pool", node, [src], fn, f"avgpool k{k} s{st} p{pd}")

    def adaptive(self, node, src, output_size):
        v = self.vals[src.tid]
        if v.dim() != 4:
            raise UnsupportedModelError(f"{node.name}: adaptive pooling needs a 4-D tensor")
        osz = _pair(output_size)
        osz = tuple(v.shape[2 + i] if o is None else int(o) for i, o in enumerate(osz))
        if osz == tuple(v.shape[2:]):
            return src  # identity
        if osz == (1, 1):
            return self.nonneg("pool", node, [src], lambda t: t.mean((2, 3), keepdim=True),
                               "global average pool")
        # any adaptive average pool is a nonnegative linear map (bin averages)
        return self.nonneg("pool", node, [src], lambda t: F.adaptive_avg_pool2d(t, osz),
                           f"adaptive average pool to {osz}")

    def call_function(self, node):
        tgt = node.target
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(a) for k, a in node.kwargs.items()}
        flat = _flatten_args(args) + _flatten_args(list(kwargs.values()))
        if not any(isinstance(a, _T) for a in flat):
            # constant / shape computation: evaluate concretely
            cargs = self.cval(list(node.args))
            ckw = self.cval(dict(node.kwargs))
            if node.op == "call_method":
                return getattr(cargs[0], tgt)(*cargs[1:], **ckw)
            return tgt(*cargs, **ckw)
        name = tgt if node.op == "call_method" else getattr(tgt, "__name__", str(tgt))
        fname = name.rstrip("_") if isinstance(name, str) else name
        a0 = args[0] if args else kwargs.get("input")

        # shape queries on data tensors
        if node.op == "call_method" and tgt in ("size", "dim"):
            return getattr(self.vals[a0.tid], tgt)(*self.cval(list(node.args[1:])))
        if tgt is getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
            return getattr(self.vals[a0.tid], node.args[1])

        if fname in ("add", "iadd", "sub", "isub", "rsub", "mul", "imul", "truediv", "div",
                     "itruediv", "neg", "pos"):
            return self.arith(node, fname, args, kwargs)
        if fname in ("cat", "concat", "concatenate"):
            ts = args[0] if args else kwargs["tensors"]
            dim = self.cval(_get(args, kwargs, 1, "dim", 0))
            if not all(isinstance(t, _T) for t in ts):
                raise UnsupportedModelError(f"{node.name}: cat of data and constant tensors")
            if dim == 0:
                raise UnsupportedModelError(f"{node.name}: cat along the batch axis")
            return self.nonneg("move", node, list(ts), lambda *t: torch.cat(t, dim), f"cat dim {dim}")
        if fname == "getitem" and isinstance(a0, (tuple, list)):
            return a0[self.cval(node.args[1])]
        if not isinstance(a0, _T):
            raise UnsupportedModelError(f"{node.name}: {name!r} with a constant first operand")
        if fname in ("split", "chunk"):
            size = self.cval(_get(args, kwargs, 1, "split_size_or_sections" if fname == "split" else "chunks",
                                  None))
            dim = self.cval(_get(args, kwargs, 2, "dim", 0)) % self.vals[a0.tid].dim()
            if dim == 0:
                raise UnsupportedModelError(f"{node.name}: split along the batch axis")
            pieces = torch.split(self.vals[a0.tid], size, dim) if fname == "split" else \
                torch.chunk(self.vals[a0.tid], size, dim)
            out, start = [], 0
            for j, piece in enumerate(pieces):
                n = piece.shape[dim]
                out.append(self.nonneg("move", node, [a0], (lambda s0, n0: lambda t: t.narrow(dim, s0, n0))(start, n),
                                       f"{fname} piece {j}", suffix=f".{j}" if j else ""))
                start += n
            return tuple(out)

        if fname in ("matmul", "matmul_") and len(args) == 2 and torch.is_tensor(args[1]) \
                and not isinstance(args[1], _T) and args[1].dim() == 2:
            w = args[1].to(DTYPE)
            return self.emit("linear", [a0.tid], node, weight=w, bias=torch.zeros(w.shape[1], dtype=DTYPE),
                             lin=lambda x, w: x @ w, lin_t=lambda c, w, in_shape: c @ w.T,
                             desc=f"matmul{tuple(w.shape)}")
        if fname in ("maximum", "minimum", "max", "min") and len(args) == 2 and isinstance(args[1], _T):
            return self.max2(node, a0, args[1], fname in ("minimum", "min"))
        if fname in ("maximum", "minimum") and len(args) == 2:
            # with a constant c: max(x, c) = relu(x − c) + c; min(x, c) = x − relu(x − c)
            c = torch.as_tensor(self.cval(node.args[1]), dtype=DTYPE)
            r = self.emit("relu", [self.affine(node, a0, 1.0, -c, suffix=".shift").tid], node, suffix=".relu")
            if fname == "maximum":
                return self.affine(node, r, 1.0, c)
            return self.emit("sub", [a0.tid, r.tid], node, desc="x - relu(x - c)")
        if fname in ("amax", "amin"):
            # over spatial axes: a max pool over them (min: −max(−x)), then the axes dropped
            dims = self.cval(_get(args, kwargs, 1, "dim", None))
            keep = bool(self.cval(_get(args, kwargs, 2, "keepdim", False)))
            shape = self.vals[a0.tid].shape
            dims = sorted(d % len(shape) for d in ((dims,) if isinstance(dims, int) else dims))
            if len(shape) != 4 or not set(dims) <= {2, 3}:
                raise UnsupportedModelError(f"{node.name}: {fname} over {dims}")
            kernel = tuple(shape[d] if d in dims else 1 for d in (2, 3))
            src = a0 if fname == "amax" else self.affine(node, a0, -1.0, None, suffix=".neg_in")
            pooled = self.maxpool(node, src, kernel)
            if fname == "amin":
                pooled = self.affine(node, pooled, -1.0, None, suffix=".neg_out")
            if keep:
                return pooled
            return self.nonneg("move", node, [pooled], lambda t: t.squeeze(3).squeeze(2) if dims == [2, 3]
                               else t.squeeze(dims[0]), f"squeeze {dims}", suffix=".squeeze")
        if fname == "pixel_shuffle":
            r = int(self.cval(_get(args, kwargs, 1, "upscale_factor", None)))
            return self.nonneg("move", node, [a0], lambda t: F.pixel_shuffle(t, r), f"pixel_shuffle {r}")
        if fname == "abs":     # relu(x) + relu(−x)
            r1 = self.emit("relu", [a0.tid], node, suffix=".relu_pos")
            r2 = self.emit("relu", [self.affine(node, a0, -1.0, None, suffix=".neg").tid], node, suffix=".relu_neg")
            return self.emit("add", [r1.tid, r2.tid], node, desc="relu(x) + relu(-x)")
        if fname == "interpolate":
            kw = {k: self.cval(v) for k, v in node.kwargs.items()}
            rest = self.cval(list(node.args[1:]))
            mode = kw.get("mode", rest[2] if len(rest) > 2 else "nearest")
            return self.nonneg("move" if mode == "nearest" else "pool", node, [a0],
                               lambda t: F.interpolate(t, *rest, **kw), f"interpolate {mode}")
        if fname == "relu":
            return self.emit("relu", [a0.tid], node)
        if fname in _SMOOTH_FUNCTIONS:
            kind, pnames = _SMOOTH_FUNCTIONS[fname]
            params = {}
            for i, pname in pnames:
                v = self.cval(_get(args, kwargs, i, pname, None))
                if v is not None:
                    params[pname] = float(v) if isinstance(v, (int, float)) else v
            return self.smooth(node, a0, kind, **params)
        if fname == "pad":
            pad = self.cval(_get(args, kwargs, 1, "pad", None))
            mode = self.cval(_get(args, kwargs, 2, "mode", "constant"))
            value = self.cval(_get(args, kwargs, 3, "value", None))
            if mode in ("reflect", "replicate"):    # a fixed gather: each stream padded alike
                return self.nonneg("move", node, [a0], lambda t: F.pad(t, list(pad), mode), f"pad {mode}")
            if mode != "constant" or value not in (None, 0, 0.0):
                raise UnsupportedModelError(f"{node.name}: only zero padding is supported")
            return self.nonneg("move", node, [a0], lambda t: F.pad(t, list(pad)), f"pad {list(pad)}")
        if fname == "leaky_relu":
            return self.leaky(node, a0, self.cval(_get(args, kwargs, 1, "negative_slope", 0.01)))
        if fname in ("relu6",):
            return self.clip(node, a0, 0.0, 6.0)
        if fname == "hardtanh":
            lo = _get(args, kwargs, 1, "min_val", -1.0)
            hi = _get(args, kwargs, 2, "max_val", 1.0)
            return self.clip(node, a0, self.cval(lo), self.cval(hi))
        if fname in ("clamp", "clip"):
            lo = self.cval(_get(args, kwargs, 1, "min", None))
            hi = self.cval(_get(args, kwargs, 2, "max", None))
            return self.clip(node, a0, lo, hi)
        if fname in ("max_pool2d", "max_pool2d_with_indices", "_max_pool2d"):
            ps = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
            kw = {p: self.cval(_get(args, kwargs, i + 1, p, None)) for i, p in enumerate(ps)}
            kw = {p: v for p, v in kw.items() if v is not None}
            return self.maxpool(node, a0, **kw)
        if fname == "avg_pool2d":
            ps = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override"]
            kw = {p: self.cval(_get(args, kwargs, i + 1, p, None)) for i, p in enumerate(ps)}
            kw = {p: v for p, v in kw.items() if v is not None}
            return self.avgpool(node, a0, **kw)
        if fname == "adaptive_avg_pool2d":
            return self.adaptive(node, a0, self.cval(_get(args, kwargs, 1, "output_size", None)))
        if fname in ("dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"):
            training = self.cval(_get(args, kwargs, 2, "training", node.op == "call_function"))
            if training:
                raise UnsupportedModelError(f"{node.name}: dropout with training=True")
            return a0
        if fname in ("contiguous", "clone", "detach", "float", "double", "to", "type_as"):
            return a0
        if fname == "stochastic_depth":      # torchvision.ops: the identity in evaluation
            p, training = self.cval(_get(args, kwargs, 1, "p", 0.0)), self.cval(_get(args, kwargs, 3, "training", True))
            if training and p > 0:
                raise UnsupportedModelError(f"{node.name}: stochastic depth in training mode")
            return a0
        if fname in ("softmax", "log_softmax"):
            return self.softmax(node, a0)
        if fname in ("flatten", "view", "reshape", "squeeze", "unsqueeze", "permute",
                     "transpose", "expand_as", "view_as", "reshape_as", "flip", "repeat",
                     "expand") or tgt is operator.getitem:
            return self.movement(node, fname, tgt, args, kwargs, a0)
        if fname in ("mean", "sum"):
            dim = self.cval(_get(args, kwargs, 1, "dim", None))
            keep = bool(self.cval(_get(args, kwargs, 2, "keepdim", False)))
            if dim is None:
                raise UnsupportedModelError(f"{node.name}: {fname} over the batch axis")
            dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
            nd = self.vals[a0.tid].dim()
            if any(d % nd == 0 for d in dims):
                raise UnsupportedModelError(f"{node.name}: {fname} over the batch axis")
            red = torch.mean if fname == "mean" else torch.sum
            return self.nonneg("pool", node, [a0], lambda t: red(t, dims, keepdim=keep),
                               f"{fname} over {dims}")
        raise UnsupportedModelError(f"{node.name}: {node.op} {name!r} is not supported")

    def movement(self, node, fname, tgt, args, kwargs, a0):
        rest = self.cval(list(args[1:]))
        ckw = self.cval(dict(kwargs))
        ckw.pop("input", None)
        if tgt is operator.getitem:
            idx = rest[0]
            first = idx[0] if isinstance(idx, tuple) else idx
            if not (first is Ellipsis or first == slice(None)):
                raise UnsupportedModelError(f"{node.name}: indexing the batch axis")
            fn = lambda t: t[idx]  # noqa: E731
        elif fname in ("view", "reshape") and len(rest) >= 1:
            shape = rest[0] if isinstance(rest[0], (tuple, list, torch.Size)) else rest
            shape = tuple(int(s) for s in shape)
            if shape[0] not in (-1, self.vals[a0.tid].shape[0]):
                raise UnsupportedModelError(f"{node.name}: reshape that mixes the batch axis")
            fn = lambda t: t.reshape(shape)  # noqa: E731
        elif fname in ("expand_as", "view_as", "reshape_as"):
            raise UnsupportedModelError(f"{node.name}: {fname} is not supported")
        else:
            meth = fname

            def fn(t):
                return getattr(t, meth)(*rest, **ckw)

        out = self.nonneg("move", node, [a0], fn, fname if isinstance(fname, str) else "getitem")
        if self.vals[out.tid].shape[0] != self.vals[a0.tid].shape[0]:
            raise UnsupportedModelError(f"{node.name}: data movement changed the batch axis")
        return out

    def arith(self, node, fname, args, kwargs):
        if fname == "neg":
            return self.affine(node, args[0], -1.0, None)
        if fname == "pos":
            return args[0]
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = self.cval(kwargs.get("alpha", 1))
        if fname == "rsub":
            a, b = b, a
            fname = "sub"
        base = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div"}.get(
            fname, fname
        )
        if base in ("add", "sub") and alpha != 1:
            if isinstance(a, _T) and isinstance(b, _T):
                raise UnsupportedModelError(f"{node.name}: {base} with alpha != 1")
            b = self.cval(b) * alpha
        da, db = isinstance(a, _T), isinstance(b, _T)
        if base == "add":
            if da and db:
                return self.two("add", node, a, b)
            src, const = (a, b) if da else (b, a)
            return self.affine(node, src, 1.0, self._const(const))
        if base == "sub":
            if da and db:
                return self.two("sub", node, a, b)
            if da:
                return self.affine(node, a, 1.0, -self._const(b))
            return self.affine(node, b, -1.0, self._const(a))
        if base == "mul":
            if da and db:
                fused = self.fused_gate(node, a, b)
                return fused if fused is not None else self.two("product", node, a, b)
            src, const = (a, b) if da else (b, a)
            return self.affine(node, src, self._const(const), None)
        if base == "div":
            if db or kwargs.get("rounding_mode") is not None:
                raise UnsupportedModelError(f"{node.name}: division by a data tensor")
            return self.affine(node, a, 1.0 / self._const(b), None)
        raise UnsupportedModelError(f"{node.name}: {fname}")

    @staticmethod
    def _const(c):
        return torch.as_tensor(c, dtype=DTYPE)

    def finish(self) -> CanonicalGraph:
        if self.output is None:
            raise UnsupportedModelError("no output found")
        producer = {op.out: op.index for op in self.ops}
        consumers: dict[int, list] = {t: [] for t in range(len(self.tensor_names))}
        for op in self.ops:
            for i in op.inputs:
                consumers[i].append(op.index)
        # output layer(s): walk back from the output through non-shift ops
        seen, stack = set(), [self.output]
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue
            seen.add(t)
            op = self.ops[producer[t]]
            if op.shift_point:
                op.output_layer = True
            else:
                stack.extend(op.inputs)
        for op in self.ops:
            op.shift = op.shift_point and not op.output_layer
        # canonical feature chain from the input
        chain, cur = [], 0
        while len(consumers[cur]) == 1:
            op = self.ops[consumers[cur][0]]
            if op.inputs != [cur]:
                break
            chain.append(op.index)
            cur = op.out
        # dead ops (not on a path to the output) are kept; they get no sensitivity
        return CanonicalGraph(
            ops=self.ops,
            output=self.output,
            tensor_names=self.tensor_names,
            names=self.names,
            targets=self.targets,
            chain=chain,
            shapes={t: tuple(v.shape) for t, v in self.vals.items()},
            producer=producer,
            consumers=consumers,
        )


@dataclass(frozen=True)
class _T:
    """Handle of a data tensor in the canonical graph."""

    tid: int


def _flatten_args(a):
    out = []
    for v in a:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten_args(v))
        else:
            out.append(v)
    return out


def _get(args, kwargs, i, name, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _short(t):
    if t is None:
        return "0"
    if torch.is_tensor(t) and t.numel() == 1:
        return f"{t.item():g}"
    return f"tensor{tuple(t.shape)}"


def _bn_affine(bn):
    if bn.training:
        raise UnsupportedModelError("BatchNorm in training mode")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("BatchNorm without running statistics")
    mean = bn.running_mean.detach().to(DTYPE)
    var = bn.running_var.detach().to(DTYPE)
    gamma = bn.weight.detach().to(DTYPE) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(DTYPE) if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def canonicalize(model: nn.Module, x: torch.Tensor, fold_bn: bool = True) -> CanonicalGraph:
    """Trace ``model`` (a float64 eval-mode copy) and build the canonical graph for input x."""
    model = copy.deepcopy(model).to(DTYPE).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.
        raise UnsupportedModelError(f"torch.fx could not trace the model: {e}") from e
    with torch.no_grad():
        return _Builder(gm, x.detach().to(DTYPE), fold_bn).build()


# ----------------------------------------------------------------------------
# smooth activations (curvature split) and products of two data tensors
# ----------------------------------------------------------------------------


def _d1(phi, u: float) -> float:
    """φ'(u) by autograd."""
    with torch.enable_grad():
        t = torch.tensor([float(u)], dtype=DTYPE, requires_grad=True)
        (d,) = torch.autograd.grad(phi(t).sum(), t)
    return float(d)


def _d2(phi, u: float) -> float:
    """φ''(u) by autograd (twice)."""
    with torch.enable_grad():
        t = torch.tensor([float(u)], dtype=DTYPE, requires_grad=True)
        (d1,) = torch.autograd.grad(phi(t).sum(), t, create_graph=True)
        if not d1.requires_grad:           # piecewise linear there
            return 0.0
        (d2,) = torch.autograd.grad(d1.sum(), t)
    return float(d2)


def _bisect_pred(pred, a: float, b: float) -> float:
    """The point in [a, b] where the boolean pred changes value, to machine precision."""
    pa = pred(a)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if pred(mid) == pa:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


class Smooth:
    """An elementwise activation φ split as φ = φ₁ − φ₂ (docs/method.md "Beyond ReLU").

    Everything is derived here from φ itself: the convex interval [lo, hi] from the sign
    of autograd's second derivative (sign changes refined by bisection), intersected with
    the concave kinks given from the function's definition (a second derivative does not
    see a kink); the slopes at ±∞ and the limit L = lim_{u→−∞} φ(u) − φ'(−∞)·u by
    autograd far out; one-sided slopes at the interval ends from inside.
    """

    GRID = 6.0     # inflection points of every supported function lie in [−6, 6]
    FAR = 60.0

    def __init__(self, name: str, phi: Callable, kinks_lo=(), kinks_hi=()):
        self.name, self.phi = name, phi
        grid = torch.linspace(-self.GRID, self.GRID, 1201, dtype=DTYPE).tolist()
        conv = [_d2(phi, u) >= 0 for u in grid]

        def pred(u):
            return _d2(phi, u) >= 0

        lo, hi = -math.inf, math.inf
        ups = downs = 0
        for i in range(len(grid) - 1):
            if conv[i] == conv[i + 1]:
                continue
            root = _bisect_pred(pred, grid[i], grid[i + 1])
            if conv[i]:                    # convex -> concave: the upper end
                hi, downs = root, downs + 1
            else:
                lo, ups = root, ups + 1
        if ups > 1 or downs > 1 or (ups and downs and lo > hi):
            raise UnsupportedModelError(f"{name}: not one convex interval")
        for k in kinks_lo:
            lo = max(lo, float(k))
        for k in kinks_hi:
            hi = min(hi, float(k))
        self.lo, self.hi = lo, hi
        far = self.FAR
        self.s_minus, self.s_plus = _d1(phi, -far), _d1(phi, far)
        with torch.no_grad():
            self.L = float(phi(torch.tensor([-far], dtype=DTYPE))) - self.s_minus * -far
        self.s_lo = self.s_minus if lo == -math.inf else self._end_slope(lo, +1, lo in kinks_lo)
        self.s_hi = self.s_plus if hi == math.inf else self._end_slope(hi, -1, hi in kinks_hi)
        # φ₁: slopes [m1, M1], c01 = lim_{u→−∞} φ₁(u) − m1·u; φ₂ = φ₁ − φ
        m1 = self.s_lo
        M1 = self.s_hi
        if lo == -math.inf:
            c01 = self.L
        else:
            with torch.no_grad():
                c01 = float(phi(torch.tensor([lo], dtype=DTYPE))) - self.s_lo * lo
        self.part1 = (m1, M1, c01)
        self.part2 = (m1 - self.s_minus, M1 - self.s_plus, c01 - self.L)

    def _end_slope(self, k: float, inward: int, kink: bool) -> float:
        """φ' at an interval end; at a kink the slope from inside, extrapolated linearly from two
        points just inside (exact where φ' is linear there: HardSwish, HardSigmoid)."""
        if not kink:
            return _d1(self.phi, k)     # an inflection point: φ' is continuous there
        d = 1e-9 * max(1.0, abs(k)) * inward
        return 2.0 * _d1(self.phi, k + d) - _d1(self.phi, k + 2 * d)

    def phi1(self, u):
        lo, hi = self.lo, self.hi
        if lo == -math.inf and hi == math.inf:
            return self.phi(u)
        v = self.phi(torch.clamp(u, None if lo == -math.inf else lo, None if hi == math.inf else hi))
        if hi != math.inf:
            v = v + self.s_hi * F.relu(u - hi)
        if lo != -math.inf:
            v = v - self.s_lo * F.relu(lo - u)
        return v

    @staticmethod
    def convex_rule(q, x, m, M, c0, P, N):
        """q = m·x + Ψ(x), Ψ nondecreasing with slopes in [0, M − m], inf Ψ = c0."""
        psi = q - m * x
        Pq = _pos(m) * P + _neg(m) * N + (psi - c0) + (M - m) * N + _pos(c0)
        Nq = _pos(m) * N + _neg(m) * P + (M - m) * N + _neg(c0)
        return Pq, Nq

    def split(self, P, N):
        """(P, N) -> (P₁ + N₂, N₁ + P₂), with P' − N' = φ(P − N)."""
        x = P - N
        q1 = self.phi1(x)
        P1, N1 = self.convex_rule(q1, x, *self.part1, P, N)
        P2, N2 = self.convex_rule(q1 - self.phi(x), x, *self.part2, P, N)
        return P1 + N2, N1 + P2

    def pair_gain(self) -> float:
        return sum(abs(m) + M - m for m, M, _ in (self.part1, self.part2))


_SMOOTH_CACHE: dict = {}


def smooth_activation(kind: str, **params) -> Smooth:
    """The Smooth of a torch activation (kind: sigmoid, tanh, softplus, elu, selu, celu, gelu,
    silu, mish, hardswish, hardsigmoid) with its parameters, cached."""
    key = (kind, tuple(sorted(params.items())))
    if key in _SMOOTH_CACHE:
        return _SMOOTH_CACHE[key]
    lo, hi = (), ()
    if kind == "sigmoid":
        phi = torch.sigmoid
    elif kind == "tanh":
        phi = torch.tanh
    elif kind == "softplus":
        beta, thr = params.get("beta", 1.0), params.get("threshold", 20.0)
        phi = lambda u: F.softplus(u, beta, thr)  # noqa: E731
    elif kind in ("elu", "selu"):
        if kind == "selu":     # torch's constants (as F.selu) unless given (ONNX's are float32)
            alpha = float(params.get("alpha", 1.6732632423543772848170429916717))
            scale = float(params.get("scale", 1.0507009873554804934193349852946))
        else:
            alpha, scale = float(params.get("alpha", 1.0)), 1.0
        if alpha <= 0:
            raise UnsupportedModelError(f"{kind} with alpha={alpha}")
        phi = (lambda u: scale * F.elu(u, alpha)) if params or kind == "elu" else (lambda u: F.selu(u))
        if alpha > 1.0:        # left slope scale·α at 0 above the right one, scale: a concave kink
            hi = (0.0,)
    elif kind == "celu":
        alpha = float(params.get("alpha", 1.0))
        if alpha <= 0:
            raise UnsupportedModelError(f"celu with alpha={alpha}")
        phi = lambda u: F.celu(u, alpha)  # noqa: E731
    elif kind == "gelu":
        approx = params.get("approximate", "none")
        if "divisor" in params:    # 0.5·u·(1 + erf(u/s)) with a given s (an exported float32 √2)
            s = float(params["divisor"])
            phi = lambda u: 0.5 * u * (1.0 + torch.erf(u / s))  # noqa: E731
        else:
            phi = lambda u: F.gelu(u, approximate=approx)  # noqa: E731
    elif kind == "silu":
        phi = F.silu
    elif kind == "mish":
        phi = F.mish
    elif kind == "hardswish":      # x·relu6(x + 3)/6: slope −1/2 → 0 at −3 and 3/2 → 1 at 3
        phi, lo, hi = F.hardswish, (-3.0,), (3.0,)
    elif kind == "hardsigmoid":    # relu6(x + 3)/6: slope 1/6 → 0 at 3 (at −3 it bends up)
        # written out: torch has no second derivative of F.hardsigmoid's backward
        if params:                 # clip(αx + β, 0, 1) with given constants (ONNX's are float32)
            a, b = float(params["alpha"]), float(params["beta"])
            if a <= 0:
                raise UnsupportedModelError(f"hardsigmoid with alpha={a}")
            phi, hi = (lambda u: torch.clamp(a * u + b, 0.0, 1.0)), ((1.0 - b) / a,)
        else:
            phi, hi = (lambda u: F.relu6(u + 3.0) / 6.0), (3.0,)
    else:
        raise UnsupportedModelError(f"activation {kind!r}")
    act = Smooth(kind, phi, lo, hi)
    act.params = dict(params)
    _SMOOTH_CACHE[key] = act
    return act


_SMOOTH_MODULES = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softplus: "softplus", nn.ELU: "elu",
                   nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish",
                   nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
# functional name -> (kind, [(positional index, parameter), ...])
_SMOOTH_FUNCTIONS = {
    "sigmoid": ("sigmoid", []), "tanh": ("tanh", []),
    "softplus": ("softplus", [(1, "beta"), (2, "threshold")]),
    "elu": ("elu", [(1, "alpha")]), "selu": ("selu", []), "celu": ("celu", [(1, "alpha")]),
    "gelu": ("gelu", [(1, "approximate")]), "silu": ("silu", []), "mish": ("mish", []),
    "hardswish": ("hardswish", []), "hardsigmoid": ("hardsigmoid", []),
}


def _module_params(m) -> dict:
    if isinstance(m, nn.Softplus):
        return {"beta": float(m.beta), "threshold": float(m.threshold)}
    if isinstance(m, (nn.ELU, nn.CELU)):
        return {"alpha": float(m.alpha)}
    if isinstance(m, nn.GELU):
        return {"approximate": m.approximate, **({"divisor": float(m.divisor)} if hasattr(m, "divisor") else {})}
    # constants other than torch's, where a module carries them (a twin of an ONNX file, whose
    # Selu and HardSigmoid constants are float32 attributes)
    if isinstance(m, nn.SELU) and hasattr(m, "alpha"):
        return {"alpha": float(m.alpha), "scale": float(m.scale)}
    if isinstance(m, nn.Hardsigmoid) and hasattr(m, "alpha"):
        return {"alpha": float(m.alpha), "beta": float(m.beta)}
    return {}


def split_smooth(op: Op, P, N):
    return op.act.split(P, N)


def split_product(P, N, Q, R):
    """x·y with x = P − N, y = Q − R (broadcasting): ½[(P+Q)² + (N+R)²] − ½[(P+R)² + (N+Q)²]."""
    return 0.5 * ((P + Q) ** 2 + (N + R) ** 2), 0.5 * ((P + R) ** 2 + (N + Q) ** 2)


# ----------------------------------------------------------------------------
# op evaluation
# ----------------------------------------------------------------------------


def plain_op(op: Op, xs):
    """The original (single-stream) op."""
    k = op.kind
    if k in ("linear", "affine"):
        y = op.lin(xs[0], op.weight)
        return y if op.bias is None else y + op.bias
    if k == "relu":
        return F.relu(xs[0])
    if k == "maxpool":
        return F.max_pool2d(xs[0], **op.pool)
    if k == "add":
        return xs[0] + xs[1]
    if k == "sub":
        return xs[0] - xs[1]
    if k in ("pool", "move"):
        return op.fn(*xs)
    if k == "smooth":
        return op.act.phi(xs[0])
    if k == "product":
        return xs[0] * xs[1]
    raise AssertionError(k)


def _gather(t, idx):
    return t.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def _argmax_idx(p, n, pool):
    with torch.no_grad():
        return F.max_pool2d(p - n, return_indices=True, **pool)[1]


def _window_sum(t, pool, out_hw):
    """Sum of each max-pool window (zero padding contributes nothing)."""
    (kh, kw), (sh, sw) = pool["kernel_size"], pool["stride"]
    (ph, pw), (dh, dw) = pool["padding"], pool["dilation"]
    B, C, H, W = t.shape
    Ho, Wo = out_hw
    eh = max(0, (Ho - 1) * sh + dh * (kh - 1) + 1 - (H + 2 * ph))
    ew = max(0, (Wo - 1) * sw + dw * (kw - 1) + 1 - (W + 2 * pw))
    tp = F.pad(t, (pw, pw + ew, ph, ph + eh))
    u = F.unfold(tp.reshape(B * C, 1, *tp.shape[2:]), (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    assert u.shape[-1] == Ho * Wo, (u.shape, Ho, Wo)
    return u.sum(1).view(B, C, Ho, Wo)


def split_linear(op: Op, p, n):
    """Four-product form: P = W+ p + W- n + b+, N = W- p + W+ n + b-."""
    wp, wn = op.wpos, op.wneg
    P = op.lin(p, wp) + op.lin(n, wn)
    N = op.lin(p, wn) + op.lin(n, wp)
    if op.bias is not None:
        P = P + _pos(op.bias)
        N = N + _neg(op.bias)
    return P, N


def split_op_pure(op: Op, ins, maxpool: str, idx=None):
    """Split rule of a linear-at-fixed-routing op, no custom autograd (used by LRP).

    For maxpool, ``idx`` (the argmax of p - n) must be given.
    """
    k = op.kind
    if k in ("linear", "affine"):
        return split_linear(op, *ins[0])
    if k == "add":
        (p1, n1), (p2, n2) = ins
        return p1 + p2, n1 + n2
    if k == "sub":
        (p1, n1), (p2, n2) = ins
        return p1 + n2, n1 + p2
    if k in ("pool", "move"):
        return op.fn(*[p for p, _ in ins]), op.fn(*[n for _, n in ins])
    if k == "smooth":
        return split_smooth(op, *ins[0])
    if k == "product":
        (p1, n1), (p2, n2) = ins
        return split_product(p1, n1, p2, n2)
    if k == "maxpool":
        p, n = ins[0]
        if maxpool == "wta":
            return _gather(p, idx), _gather(n, idx)
        sn = _window_sum(n, op.pool, idx.shape[2:])
        # N is returned as its own tensor: sensitivities read at N must not include P's use of sn
        return _gather(p, idx) + (sn - _gather(n, idx)), sn.clone()
    raise AssertionError(k)


class _Recenter(torch.autograd.Function):
    """(p, n) -> (p - min(p, n), n - min(p, n)); identity backward."""

    @staticmethod
    def forward(ctx, p, n):
        m = torch.minimum(p, n)
        return p - m, n - m

    @staticmethod
    def backward(ctx, gp, gn):
        return gp, gn


class _AlphaShift(torch.autograd.Function):
    """Identity forward; on the cotangent pair: (dp - a(dp+dn), dn - a(dp+dn))."""

    @staticmethod
    def forward(ctx, p, n, a):
        ctx.a = a
        return p.clone(), n.clone()

    @staticmethod
    def backward(ctx, gp, gn):
        s = gp + gn
        return gp - ctx.a * s, gn - ctx.a * s, None


class _ReluSplit(torch.autograd.Function):
    """(P, N) -> (max(P, N), N) with the backward modes of docs/method.md §3."""

    @staticmethod
    def forward(ctx, P, N, mode, geq):
        d = P - N
        m = (d >= 0) if geq else (d > 0)
        ctx.mode = mode
        ctx.save_for_backward(m.to(P.dtype))
        return torch.maximum(P, N), N.clone()

    @staticmethod
    def backward(ctx, gyp, gyn):
        (m,) = ctx.saved_tensors
        if ctx.mode == "standard":
            gP, gN = m * gyp, (1 - m) * gyp + gyn
        elif ctx.mode == "mask_diff":
            gP, gN = (2 * m - 1) * gyp, gyn
        elif ctx.mode == "sum":
            gP, gN = m * gyp + (1 - m) * gyn, gyn
        else:
            raise AssertionError(ctx.mode)
        return gP, gN, None, None


def relu_mask(P, N, ties: str):
    d = P - N
    return ((d >= 0) if ties == "geq" else (d > 0)).to(P.dtype)


# ----------------------------------------------------------------------------
# result and run()
# ----------------------------------------------------------------------------


@dataclass
class DCResult:
    logits: torch.Tensor  # f [B, K] (plain forward of the canonical / folded model)
    g: torch.Tensor  # [B, K]
    h: torch.Tensor  # [B, K]
    target: torch.Tensor  # LongTensor [B]
    streams: dict  # key -> (p, n)
    sens: dict  # key -> (dpp, dnp, dpn, dnn)
    relevance: dict  # key -> (Rg_p, Rg_n, Rh_p, Rh_n)
    grad: dict  # key -> d f_target / d tensor (plain autograd)
    acts: dict  # key -> plain activation (the original tensor x at key)
    lrp_sums: dict  # key -> (sum of g-relevance [B], sum of h-relevance [B])
    pre_streams: dict  # key -> (P, N) of the producing op before recentering
    graph: CanonicalGraph
    keys: dict  # key -> tensor id
    alphas: dict  # op index -> alpha used at its inputs (shifted ops only)
    options: dict


def _target_tensor(target, logits):
    B = logits.shape[0]
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(B).clone()
    if t.shape != (B,):
        raise ValueError(f"target must be an int or LongTensor[{B}]")
    return t


def _alpha_for(op: Op, alpha: float, alpha_mode: str) -> float:
    if alpha_mode == "frobenius" and op.kind == "linear":
        return max(0.0, (1.0 - 1.0 / float(op.weight.norm())) / 2.0)
    return float(alpha)


def run(model: nn.Module, x: torch.Tensor, target=None, *, alpha: float = 0.35,
        relu_backward: str = "standard", maxpool: str = "wta", stabilize: str = "recenter",
        ties: str = "strict", fold_bn: bool = True, alpha_mode: str = "constant",
        lrp_epsilon: float = 1e-6, layers=None, graph: CanonicalGraph | None = None,
        lrp: bool = True) -> DCResult:
    """Evaluate the DC decomposition of ``model`` at ``x`` (float64).

    layers: keys whose values are kept besides "input": an int N / "N" (tensor
    entering op N of the canonical chain), "N:out" (leaving op N), an fx node
    name or module qualified name, a canonical tensor name, or the string
    "all" (every tensor of the canonical graph, keyed by canonical name).
    graph: a CanonicalGraph from canonicalize(model, x, fold_bn) to reuse
    (it must have been built with the same fold_bn and input shape).
    lrp: False skips SplitLRP (res.relevance and res.lrp_sums stay empty).
    """
    if relu_backward not in ("standard", "sum", "mask_diff"):
        raise ValueError(f"relu_backward={relu_backward!r}")
    if maxpool not in ("wta", "dc"):
        raise ValueError(f"maxpool={maxpool!r}")
    if stabilize not in ("recenter", "none"):
        raise ValueError(f"stabilize={stabilize!r}")
    if ties not in ("strict", "geq"):
        raise ValueError(f"ties={ties!r}")
    if alpha_mode not in ("constant", "frobenius"):
        raise ValueError(f"alpha_mode={alpha_mode!r}")
    if not 0.0 <= float(alpha) <= 0.5:
        raise ValueError("alpha must be in [0, 0.5]")
    options = dict(alpha=float(alpha), relu_backward=relu_backward, maxpool=maxpool,
                   stabilize=stabilize, ties=ties, fold_bn=fold_bn, alpha_mode=alpha_mode,
                   lrp_epsilon=lrp_epsilon, lrp=lrp)

    x = x.detach().to(DTYPE)
    G = graph if graph is not None else canonicalize(model, x, fold_bn=fold_bn)
    ops = G.ops

    # keys to keep
    if layers == "all":
        layers = list(G.tensor_names)
    key_list = ["input"] + [k for k in (layers or []) if k != "input"]
    keys = {k: G.resolve(k) for k in key_list}
    kept = sorted(set(keys.values()))

    # ---- plain forward + autograd gradient ---------------------------------
    with torch.enable_grad():
        xs = x.clone().requires_grad_(True)
        vals = {0: xs}
        for op in ops:
            vals[op.out] = plain_op(op, [vals[i] for i in op.inputs])
        f = vals[G.output]
        tgt = _target_tensor(target, f.detach())
        sel = f.gather(1, tgt[:, None]).sum()
        gr = torch.autograd.grad(sel, [vals[t] for t in kept], allow_unused=True,
                                 materialize_grads=True)
    grad_t = dict(zip(kept, gr))
    act_t = {t: vals[t].detach() for t in kept}
    logits = f.detach()

    # ---- split forward -----------------------------------------------------
    mode_geq = ties == "geq"
    alphas = {}
    with torch.enable_grad():
        p0 = F.relu(x).requires_grad_(True)
        n0 = F.relu(-x).requires_grad_(True)
        S = {0: (p0, n0)}
        pre = {}
        idxs = {}
        for op in ops:
            ins = []
            a_op = _alpha_for(op, alpha, alpha_mode) if op.shift else None
            if op.shift:
                alphas[op.index] = a_op
            for i in op.inputs:
                p, n = S[i]
                if op.shift:
                    p, n = _AlphaShift.apply(p, n, a_op)
                ins.append((p, n))
            if op.kind == "relu":
                P, N = _ReluSplit.apply(ins[0][0], ins[0][1], relu_backward, mode_geq)
            elif op.kind == "maxpool":
                idx = _argmax_idx(ins[0][0], ins[0][1], op.pool)
                idxs[op.index] = idx
                P, N = split_op_pure(op, ins, maxpool, idx)
            else:
                P, N = split_op_pure(op, ins, maxpool)
            pre[op.out] = (P, N)
            if stabilize == "recenter" and op.recenter_point:
                P, N = _Recenter.apply(P, N)
            S[op.out] = (P, N)
        g, h = S[G.output]
        sel_g = 0.5 * g.gather(1, tgt[:, None]).sum()
        sel_h = 0.5 * h.gather(1, tgt[:, None]).sum()
        wrt = [z for t in kept for z in S[t]]
        dg = torch.autograd.grad(sel_g, wrt, retain_graph=True, allow_unused=True,
                                 materialize_grads=True)
        dh = torch.autograd.grad(sel_h, wrt, allow_unused=True, materialize_grads=True)
    sens_t = {}
    for j, t in enumerate(kept):
        sens_t[t] = (dg[2 * j], dg[2 * j + 1], dh[2 * j], dh[2 * j + 1])
    Sd = {t: (p.detach(), n.detach()) for t, (p, n) in S.items()}
    pred = {t: (P.detach(), N.detach()) for t, (P, N) in pre.items()}
    pred[0] = Sd[0]

    # ---- SplitLRP ------------------------------------------------------------
    gd, hd = g.detach(), h.detach()
    if lrp:
        onehot = torch.zeros_like(gd).scatter_(1, tgt[:, None], 1.0)
        Rg = _lrp(G, Sd, pred, idxs, (gd * onehot, torch.zeros_like(gd)), maxpool, ties,
                  lrp_epsilon, kept)
        Rh = _lrp(G, Sd, pred, idxs, (torch.zeros_like(hd), hd * onehot), maxpool, ties,
                  lrp_epsilon, kept)

    def _bsum(t):
        return t.reshape(t.shape[0], -1).sum(1)

    res = DCResult(
        logits=logits, g=gd, h=hd, target=tgt,
        streams={}, sens={}, relevance={}, grad={}, acts={}, lrp_sums={}, pre_streams={},
        graph=G, keys=keys, alphas=alphas, options=options,
    )
    for k, t in keys.items():
        res.streams[k] = Sd[t]
        res.pre_streams[k] = pred[t]
        res.sens[k] = sens_t[t]
        res.grad[k] = grad_t[t]
        res.acts[k] = act_t[t]
        if lrp:
            res.relevance[k] = Rg[t] + Rh[t]
            res.lrp_sums[k] = (_bsum(Rg[t][0]) + _bsum(Rg[t][1]),
                               _bsum(Rh[t][0]) + _bsum(Rh[t][1]))
    return res


def _vjp(fn, ins, cot):
    """Vector-Jacobian product of the (linear) stream map fn at ins."""
    with torch.enable_grad():
        leaves = [(p.detach().requires_grad_(True), n.detach().requires_grad_(True)) for p, n in ins]
        P, N = fn(leaves)
        flat = [z for pr in leaves for z in pr]
        gs = torch.autograd.grad((P, N), flat, cot, allow_unused=True, materialize_grads=True)
    return [(gs[2 * j], gs[2 * j + 1]) for j in range(len(ins))]


def _lrp(G: CanonicalGraph, S, pre, idxs, seed, maxpool, ties, eps, kept):
    """Epsilon-LRP through the stream graph (docs/method.md §4); returns {tid: (R_p, R_n)}."""
    R = {G.output: seed}
    for op in reversed(G.ops):
        if op.out not in R:
            continue
        RP, RN = R[op.out] if op.out in kept else R.pop(op.out)  # recentering: unchanged
        ins = [S[i] for i in op.inputs]
        k = op.kind
        if k == "relu":
            (p, n), = ins
            m = relu_mask(p, n, ties)
            contrib = [(m * RP, (1 - m) * RP + RN)]
        elif k == "smooth":  # relevance passes unchanged on each stream
            contrib = [(RP, RN)]
        elif k == "product":  # epsilon rule on the four squares, each to its two summands
            P_, N_ = pre[op.out]
            sP, sN = RP / (P_ + eps), RN / (N_ + eps)
            (p, n), (q, r) = ins
            PQ, NR, PR, NQ = p + q, n + r, p + r, n + q
            contrib = [((p * 0.5 * (PQ * sP + PR * sN)).sum_to_size(p.shape),
                        (n * 0.5 * (NR * sP + NQ * sN)).sum_to_size(n.shape)),
                       ((q * 0.5 * (PQ * sP + NQ * sN)).sum_to_size(q.shape),
                        (r * 0.5 * (NR * sP + PR * sN)).sum_to_size(r.shape))]
        elif k == "move" or (k == "maxpool" and maxpool == "wta"):
            idx = idxs.get(op.index)
            contrib = _vjp(lambda lv: split_op_pure(op, lv, maxpool, idx), ins, (RP, RN))
        elif k in ("linear", "affine"):  # epsilon rule, explicit transposes
            P, N = pre[op.out]
            sP, sN = RP / (P + eps), RN / (N + eps)
            (p, n), = ins
            wp, wn = op.wpos, op.wneg
            sh = p.shape
            back_p = op.lin_t(sP, wp, sh) + op.lin_t(sN, wn, sh)  # W+^T s_P + W-^T s_N
            back_n = op.lin_t(sP, wn, sh) + op.lin_t(sN, wp, sh)  # W-^T s_P + W+^T s_N
            contrib = [(p * back_p, n * back_n)]
        else:  # epsilon rule with the op's own output streams (before recentering)
            P, N = pre[op.out]
            sP, sN = RP / (P + eps), RN / (N + eps)
            idx = idxs.get(op.index)
            back = _vjp(lambda lv: split_op_pure(op, lv, maxpool, idx), ins, (sP, sN))
            contrib = [(p * bp, n * bn) for (p, n), (bp, bn) in zip(ins, back)]
        for i, (rp, rn) in zip(op.inputs, contrib):
            if i in R:
                R[i] = (R[i][0] + rp, R[i][1] + rn)
            else:
                R[i] = (rp, rn)
    out = {}
    for t in kept:
        if t in R:
            out[t] = R[t]
        else:
            z = torch.zeros_like(S[t][0])
            out[t] = (z, z.clone())
    return out


# ----------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------


def channel_sum(t: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w] (sum over channels); [B, F] is returned as is."""
    if t.dim() >= 3:
        return t.sum(1)
    return t


def splitgrad(res: DCResult, key) -> torch.Tensor:
    """SplitGrad = sum_c (dpp + dnn)."""
    dpp, dnp, dpn, dnn = res.sens[key]
    return channel_sum(dpp + dnn)


def splitcam(res: DCResult, key) -> torch.Tensor:
    """SplitCAM = ReLU( sum_c [ReLU(dpp + dnn) * p + ReLU(dpp + dnn) * n] )  (docs/method.md §4)."""
    dpp, dnp, dpn, dnn = res.sens[key]
    p, n = res.streams[key]
    s = F.relu(dpp + dnn)
    return F.relu(channel_sum(s * p + s * n))


def splitlrp(res: DCResult, key) -> torch.Tensor:
    """SplitLRP = sum_c (Rg_p + Rg_n - Rh_p - Rh_n)."""
    rgp, rgn, rhp, rhn = res.relevance[key]
    return channel_sum(rgp + rgn - rhp - rhn)


def upsample(m: torch.Tensor, size) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear, align_corners=False (half-pixel centres)."""
    size = tuple(int(s) for s in size)
    if tuple(m.shape[-2:]) == size:
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
