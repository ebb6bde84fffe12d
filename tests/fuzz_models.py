"""Random CNNs for property-based tests: hypothesis strategies that draw a network spec from
the supported op table, a torch builder for it, and the float64 checks.

Drawn: Conv (kernel, stride, padding, dilation, groups, bias, weights of one sign or both),
BatchNorm, ConvTranspose, max/avg pooling (ceil mode, padding, dilation), global max pool,
residual (add/sub) and concat branches, constant mul/div/add, zero and reflect/edge pads,
slices, gather-type moves, nearest/bilinear upsampling, max/min of a branch, abs, dropout,
Casts to float64 and back;
the activations ReLU, ReLU6, LeakyReLU, PReLU, Hardtanh and every smooth one the compiler
converts by the curvature split: Sigmoid, Tanh, Softplus, ELU and CELU (α ≤ 1 and α > 1),
SELU, GELU (erf form; tanh form at opset 20, where TorchScript writes the Gelu op), SiLU,
Mish, HardSwish, HardSigmoid; squeeze-excitation gates x·gate(conv(act(conv(gap x)))) with a
sigmoid or hardsigmoid gate [N, C, 1, 1] broadcast over x, and GLU-style products a·gate(b)
of the two channel halves of x; heads flatten/gap/mean + Gemm or MatMul (one or two, with
a ReLU, ReLU6, SiLU, GELU, Tanh or HardSwish between), 1×1 conv + gap, optional Softmax.

A spec is plain frozen data (its repr is the reproducer hypothesis prints). Every
layer is drawn for the shape that reaches it, so every spec is valid: no examples
are rejected. The reference gradient is torch autograd through the *exported* ONNX
graph (evaluated op by op by tests/onnx_torch.py in float64), so the identity is
checked on exactly the function the compiler was given, free of float32 rounding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import onnx_torch
from helpers import export

# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Conv:
    out: int
    k: tuple            # (kh, kw)
    stride: int
    pad: int
    dil: int
    groups: int
    bias: bool
    sign: str = "mixed"   # "mixed" | "positive" | "negative": the sign of every weight


@dataclass(frozen=True)
class BN:
    pass


@dataclass(frozen=True)
class Act:
    kind: str           # one of ACTS (relu | relu6 | leaky | prelu | hardtanh | smooth kinds, SMOOTH)
    param: float = 0.0  # leaky's slope, hardtanh's p (clip to [−p, 2p]), elu's and celu's α


@dataclass(frozen=True)
class MaxPool:
    k: int
    stride: int
    pad: int
    dil: int
    ceil: bool


@dataclass(frozen=True)
class AvgPool:
    k: int
    stride: int
    pad: int
    include_pad: bool
    ceil: bool


@dataclass(frozen=True)
class Residual:
    branch: tuple       # layers, shape-preserving apart from the shortcut's stride
    op: str             # "add" (x + b), "sub" (b − x), "rsub" (x − b)
    shortcut: Conv | None = None


@dataclass(frozen=True)
class Concat:
    branches: tuple     # each a tuple of layers (empty = the input itself)


@dataclass(frozen=True)
class Affine:
    kind: str           # "mul" (per-channel, both signs) | "div" | "add"
    value: float


@dataclass(frozen=True)
class Pad:
    pads: tuple         # (left, right, top, bottom), zeros


@dataclass(frozen=True)
class Slice:
    c0: int
    c1: int


@dataclass(frozen=True)
class Dropout:
    pass


@dataclass(frozen=True)
class CastRoundTrip:
    """Cast to float64 and back (exported as two Casts in a float32 net, nothing in the float64
    twin): the converted float32 graph is the cast-free one."""


@dataclass(frozen=True)
class Upsample:
    mode: str           # nearest | bilinear
    scale: int          # scale_factor (size=None) or the factor giving `size`
    align: bool = False  # align_corners (bilinear)
    by_size: bool = False  # size=(h·scale, w·scale): sizes computed from the input's Shape


@dataclass(frozen=True)
class ConvT:
    out: int
    k: int
    stride: int
    pad: int
    outpad: int
    dil: int
    groups: int
    bias: bool


@dataclass(frozen=True)
class MaxMin:
    op: str             # "max" | "min" of the input and a shape-keeping Conv of it
    branch: Conv


@dataclass(frozen=True)
class Abs:
    pass


@dataclass(frozen=True)
class Move:
    kind: str           # flip | steps | reflect | edge | tile | gather | expand (a fixed gather per sample)


@dataclass(frozen=True)
class GlobalMax:
    pass


@dataclass(frozen=True)
class SE:
    """Squeeze-excitation: x · gate(conv(act(conv(gap x)))), the gate [N, C, 1, 1] broadcast over x."""
    reduced: int        # the squeezed width
    act: Act
    gate: str           # sigmoid | hardsigmoid


@dataclass(frozen=True)
class Glu:
    """GLU-style product of two data tensors: a · gate(b), (a, b) the two channel halves of x."""
    gate: str           # sigmoid | hardsigmoid


@dataclass(frozen=True)
class Head:
    kind: str           # flatten | gap | mean | matmul | conv_gap
    classes: int
    hidden: int = 0     # a second Gemm of this width (0: one Gemm)
    act: str = "relu"
    softmax: bool = False


@dataclass(frozen=True)
class NetSpec:
    in_shape: tuple     # (C, H, W)
    body: tuple
    head: Head
    seed: int
    keep_bn: bool = False
    opset: int = 17


def _ceil_agrees(n: int, k: int, s: int, p: int, d: int = 1) -> bool:
    """torch drops a last ceil_mode window that starts in the right padding; ONNX shape
    inference (opset < 19) does not. Draw ceil_mode only where both agree."""
    num = n + 2 * p - (d * (k - 1) + 1)
    return num < 0 or (-(-num // s)) * s < n + p


def _windows_see_input(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> bool:
    """Every pooling window has a tap inside the input (a dilated window can fall between the
    rows of a small input, all in the padding: torch's max is then −inf, and the net gives NaN)."""
    return all(any(0 <= i * s - p + j * d < n for j in range(k)) for i in range(out_size(n, k, s, p, d, ceil)))


def out_size(n: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    eff = d * (k - 1) + 1
    num = n + 2 * p - eff
    if num < 0:
        return 0
    o = (-(-num // s) if ceil else num // s) + 1
    if ceil and (o - 1) * s >= n + p:    # the last window must start inside the input or left pad
        o -= 1
    return o


# ----------------------------------------------------------------------------- strategies

# torch's SELU constants (F.selu), as float64
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

PIECEWISE = ("relu", "relu", "relu", "relu6", "leaky", "prelu", "hardtanh")
# every smooth (or kinked, curvature-split) activation the compiler converts; "gelu_tanh" only
# at opset 20 (net_specs), where TorchScript writes the Gelu op
SMOOTH = ("sigmoid", "tanh", "softplus", "elu", "selu", "celu", "gelu", "gelu_tanh", "silu", "mish",
          "hardswish", "hardsigmoid")
ACTS = PIECEWISE + SMOOTH
GATES = ("sigmoid", "hardsigmoid")
# the activations whose saturated values (ReLU6's 6, Hardtanh's −p and 2p, HardSwish's and
# HardSigmoid's 0 and 1) the reference's streams hold only to rounding: ties (see net_specs)
CLIPS = ("relu6", "hardtanh", "hardswish", "hardsigmoid")


@st.composite
def conv_layer(draw, shape, *, same: bool = False, out: int | None = None, stride: int | None = None):
    """A Conv valid for `shape`; `same` keeps H, W (odd kernel, padding d(k−1)/2, stride 1)."""
    c, h, w = shape
    out = out if out is not None else draw(st.integers(1, 8))
    groups = draw(st.sampled_from([g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0]))
    dil = draw(st.sampled_from([1, 1, 1, 2, 3]))
    if same:
        k = draw(st.sampled_from([1, 3, 3, 5]))
        kk = (k, k)
        pad, s = dil * (k - 1) // 2, stride or 1
    else:
        kh = draw(st.integers(1, 5))
        kw = draw(st.one_of(st.just(kh), st.integers(1, 5)))
        kk = (kh, kw)
        s = stride or draw(st.sampled_from([1, 1, 1, 2, 3]))
        pad = draw(st.integers(0, max(0, dil * (max(kk) - 1) // 2)))
        # shrink the kernel until it fits the padded input
        while out_size(h, kk[0], s, pad, dil) < 1 or out_size(w, kk[1], s, pad, dil) < 1:
            kk = (max(1, kk[0] - 1), max(1, kk[1] - 1))
            if kk == (1, 1):
                dil = 1
    sign = draw(st.sampled_from(["mixed", "mixed", "mixed", "positive", "negative"]))
    return Conv(out, kk, s, pad, dil, groups, draw(st.booleans()), sign)


def conv_shape(shape, conv: Conv):
    c, h, w = shape
    return (conv.out, out_size(h, conv.k[0], conv.stride, conv.pad, conv.dil),
            out_size(w, conv.k[1], conv.stride, conv.pad, conv.dil))


@st.composite
def activation(draw):
    kind = draw(st.sampled_from(ACTS))
    param = 0.0
    if kind == "leaky":
        param = draw(st.sampled_from([0.0, 0.01, 0.1, 0.3]))
    if kind == "hardtanh":
        param = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if kind in ("elu", "celu"):     # α exact in float32 (ONNX's attribute type); α > 1: a concave kink
        param = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0]))
    return Act(kind, param)


@st.composite
def pool_layer(draw, shape):
    c, h, w = shape
    k = draw(st.integers(1, 3))
    s = draw(st.integers(1, k))
    pad = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    is_max = draw(st.booleans())
    dil = draw(st.sampled_from([1, 1, 2])) if is_max else 1
    if ceil and not all(_ceil_agrees(n, k, s, pad, dil) for n in (h, w)):
        ceil = False
    if out_size(min(h, w), k, s, pad, dil, ceil) < 1:
        return None
    if not all(_windows_see_input(n, k, s, pad, dil, ceil) for n in (h, w)):
        return None
    if is_max:
        return MaxPool(k, s, pad, dil, ceil)
    return AvgPool(k, s, pad, draw(st.booleans()), ceil)


def pool_shape(shape, p):
    c, h, w = shape
    dil = getattr(p, "dil", 1)
    return (c, out_size(h, p.k, p.stride, p.pad, dil, p.ceil), out_size(w, p.k, p.stride, p.pad, dil, p.ceil))


def move_shape(shape, m: Move):
    c, h, w = shape
    return {"steps": (c, (h + 1) // 2, w // 2), "reflect": (c, h + 2, w + 1), "edge": (c, h + 2, w + 1),
            "tile": (2 * c, h, w), "gather": (3, h, w), "expand": (2, h, w)}.get(m.kind, shape)


_MOVES = {"flip": lambda x: x.flip(3), "steps": lambda x: x[:, :, ::2, 1::2],
          "reflect": lambda x: F.pad(x, (1, 0, 1, 1), mode="reflect"),
          "edge": lambda x: F.pad(x, (0, 1, 2, 0), mode="replicate"), "tile": lambda x: x.repeat(1, 2, 1, 1),
          "gather": lambda x: x[:, [-1, 0, -1]],
          "expand": lambda x: x[:, :1].expand(-1, 2, -1, -1)}


def convt_out(n: int, l: ConvT) -> int:
    return (n - 1) * l.stride - 2 * l.pad + l.dil * (l.k - 1) + l.outpad + 1


@st.composite
def convt_layer(draw, shape):
    """A ConvTranspose2d for `shape` whose output is 1 to 16 pixels a side, or None."""
    c, h, w = shape
    out = draw(st.integers(1, 6))
    groups = draw(st.sampled_from([g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0]))
    k = draw(st.integers(1, 3))
    dil = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, dil * (k - 1) // 2))
    # torch allows output_padding < max(stride, dilation); onnxruntime's ConvTranspose only < stride
    outpad = draw(st.integers(0, stride - 1))
    layer = ConvT(out, k, stride, pad, outpad, dil, groups, draw(st.booleans()))
    if not all(1 <= convt_out(n, layer) <= 16 for n in (h, w)):
        return None
    return layer


def convt_shape(shape, l: ConvT):
    c, h, w = shape
    return (l.out, convt_out(h, l), convt_out(w, l))


@st.composite
def block(draw, shape):
    """One body element for `shape`; returns (layers, new shape)."""
    c, h, w = shape
    kinds = ["conv", "conv", "conv", "act", "act", "bn", "pool", "affine", "pad", "dropout",
             "residual", "residual", "concat", "concat", "convT", "maxmin", "abs", "gmax", "move", "se", "se",
             "cast"]
    if c >= 2:
        kinds.append("slice")
    if c % 2 == 0:
        kinds.append("glu")
    if max(h, w) <= 6:
        kinds.append("upsample")
    kind = draw(st.sampled_from(kinds))
    if kind == "upsample":
        mode = draw(st.sampled_from(["nearest", "bilinear"]))
        scale = draw(st.sampled_from([2, 3]))
        align = mode == "bilinear" and draw(st.booleans())
        return [Upsample(mode, scale, align, draw(st.booleans()))], (c, h * scale, w * scale)
    if kind == "convT":
        layer = draw(convt_layer(shape))
        if layer is None:
            return [], shape
        layers = [layer]
        if draw(st.booleans()):
            layers.append(draw(activation()))
        return layers, convt_shape(shape, layer)
    if kind == "maxmin":
        return [MaxMin(draw(st.sampled_from(["max", "min"])), draw(conv_layer(shape, same=True, out=c)))], shape
    if kind == "abs":
        return [Abs()], shape
    if kind == "move":
        moves = ["flip", "tile", "gather", "expand"] + (["steps", "reflect", "edge"] if min(h, w) >= 2 else [])
        m = Move(draw(st.sampled_from(moves)))
        return [m], move_shape(shape, m)
    if kind == "gmax":
        return [GlobalMax()], (c, 1, 1)
    if kind == "se":
        return [SE(draw(st.integers(1, max(1, c // 2))), draw(activation()), draw(st.sampled_from(GATES)))], shape
    if kind == "glu":
        return [Glu(draw(st.sampled_from(GATES)))], (c // 2, h, w)
    if kind == "conv":
        conv = draw(conv_layer(shape))
        layers = [conv]
        shape = conv_shape(shape, conv)
        if draw(st.booleans()):
            layers.append(BN())
        if draw(st.integers(0, 3)):
            layers.append(draw(activation()))
        return layers, shape
    if kind == "act":
        return [draw(activation())], shape
    if kind == "bn":
        return [BN()], shape
    if kind == "pool":
        p = draw(pool_layer(shape))
        return ([p], pool_shape(shape, p)) if p is not None else ([], shape)
    if kind == "affine":
        k = draw(st.sampled_from(["mul", "div", "add"]))
        v = draw(st.sampled_from([-2.0, -0.5, 0.5, 1.5, 3.0]))
        return [Affine(k, v)], shape
    if kind == "pad":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        return [Pad(pads)], (c, h + pads[2] + pads[3], w + pads[0] + pads[1])
    if kind == "dropout":
        return [Dropout()], shape
    if kind == "cast":
        return [CastRoundTrip()], shape
    if kind == "slice":
        c0 = draw(st.integers(0, c - 1))
        c1 = draw(st.integers(c0 + 1, c))
        return [Slice(c0, c1)], (c1 - c0, h, w)
    if kind == "residual":
        stride = draw(st.sampled_from([1, 1, 2])) if min(h, w) >= 2 else 1
        first = draw(conv_layer(shape, same=True, out=c, stride=stride))
        branch = [first]
        if draw(st.booleans()):
            branch.append(BN())
        branch.append(draw(activation()))
        sub = conv_shape(shape, first)
        if draw(st.booleans()):
            branch.append(draw(conv_layer(sub, same=True, out=c)))
        shortcut = None
        if stride > 1:
            shortcut = Conv(c, (1, 1), stride, 0, 1, 1, False, "mixed")
        op = draw(st.sampled_from(["add", "add", "sub", "rsub"]))
        return [Residual(tuple(branch), op, shortcut)], sub
    # concat: branches keep H, W; the input itself may be one of them
    n = draw(st.integers(2, 3))
    branches = []
    out_c = 0
    for _ in range(n):
        if draw(st.integers(0, 3)) == 0:
            branches.append(())
            out_c += c
            continue
        conv = draw(conv_layer(shape, same=True))
        br = [conv]
        if draw(st.booleans()):
            br.append(draw(activation()))
        branches.append(tuple(br))
        out_c += conv.out
    return [Concat(tuple(branches))], (out_c, h, w)


@st.composite
def net_specs(draw, max_blocks: int = 6):
    """A random ReLU CNN: input shape, body, head, weight seed, export options."""
    c = draw(st.integers(1, 4))
    h = draw(st.integers(3, 12))
    w = draw(st.one_of(st.just(h), st.integers(3, 12)))
    in_shape = shape = (c, h, w)
    body = []
    clipped = saturated = smoothed = False
    zeros_shifted = (False, False, False)
    for _ in range(draw(st.integers(1, max_blocks))):
        layers, new_shape = draw(block(shape))
        if clipped and any(isinstance(l, (MaxPool, GlobalMax, MaxMin)) for l in layers):
            # ReLU6/Hardtanh saturate to one value: exact ties in a max window, which dconnx breaks
            # on the original activation and the float64 reference on its Relu form, rounded
            continue
        if saturated and _reached_before_mix(layers, _is_clip):
            # a clip's saturated value (exactly 2p or 6) at the next clip's kink: an exact tie, which
            # dconnx breaks on the original activation and the reference on its Relu form, rounded
            continue
        if smoothed and _reached_before_mix(layers, _is_kink):
            # a smooth activation keeps an exact 0 (GELU, SiLU, Tanh, … of a Relu's zeros) that the
            # reference's streams hold only to rounding: a tie at the next kink or in a max window
            continue
        if _zeros_shifted(layers, zeros_shifted)[2]:
            # a Relu's zeros through a BatchNorm (or a constant affine op) stay one value per channel,
            # a tie in a max window, which dconnx breaks on the original activation and the
            # reference on p − n, rounded (found by the fuzzer: Concat(Conv, Conv-Relu), BN, MaxPool)
            continue
        clipped = clipped or _has_clip(layers)
        zeros_shifted = _zeros_shifted(layers, zeros_shifted)
        saturated = _leaves(layers, saturated, _is_clip)
        smoothed = _leaves(layers, smoothed, _is_smooth)
        body += layers
        shape = new_shape
    c, h, w = shape
    kinds = ["flatten", "gap", "mean", "matmul", "conv_gap"]
    if c * h * w > 1024:
        kinds = ["gap", "mean", "conv_gap"]
    kind = draw(st.sampled_from(kinds))
    hidden = draw(st.sampled_from([0, 0, 4, 9])) if kind != "conv_gap" else 0
    head = Head(kind, draw(st.integers(1, 6)), hidden,
                draw(st.sampled_from(["relu", "relu", "relu6", "none", "silu", "gelu", "tanh", "hardswish"])),
                softmax=draw(st.sampled_from([False] * 7 + [True])))
    opset = draw(st.sampled_from([17, 17, 18, 20]))
    if "gelu_tanh" in _act_kinds(body):
        # below opset 20 TorchScript writes GELU's tanh form out (x·x·x, Tanh, three data products),
        # which converts exactly, but as products, not as the one activation the reference splits
        opset = 20
    return NetSpec(in_shape, tuple(body), head, draw(st.integers(0, 2**16)),
                   keep_bn=draw(st.booleans()), opset=opset)


# ----------------------------------------------------------------------------- torch builder


class _Residual(nn.Module):
    def __init__(self, branch, shortcut, op):
        super().__init__()
        self.branch, self.shortcut, self.op = branch, shortcut, op

    def forward(self, x):
        b = self.branch(x)
        s = x if self.shortcut is None else self.shortcut(x)
        if self.op == "add":      # one branch per op, so that torch.fx traces only the one computed
            return s + b
        return b - s if self.op == "sub" else s - b


class _Concat(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class _Affine(nn.Module):
    def __init__(self, kind, value, c):
        super().__init__()
        self.kind = kind
        signs = torch.tensor([(-1.0) ** i * (1 + i / c) for i in range(c)]).view(c, 1, 1)
        self.register_buffer("const", value * signs)
        self.value = value

    def forward(self, x):
        if self.kind == "mul":
            return x * self.const
        if self.kind == "div":
            return x / self.value
        return x + self.const


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _MatMul(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_in, n_out))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.w + self.b


class _SE(nn.Module):
    def __init__(self, c, l: SE):
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.act = nn.Conv2d(c, l.reduced, 1), _act(l.act, l.reduced)
        self.expand, self.gate = nn.Conv2d(l.reduced, c, 1), _act(l.gate, c)

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.squeeze(x)))))


class _Glu(nn.Module):
    def __init__(self, gate, c):
        super().__init__()
        self.gate = _act(gate, c // 2)

    def forward(self, x):
        a, b = x.chunk(2, 1)
        return a * self.gate(b)


class _MaxMin(nn.Module):
    def __init__(self, branch, op):
        super().__init__()
        self.branch, self.op = branch, op

    def forward(self, x):
        return (torch.maximum if self.op == "max" else torch.minimum)(x, self.branch(x))


def _act(a: Act | str, c: int) -> nn.Module:
    kind = a.kind if isinstance(a, Act) else a
    if kind == "relu":
        return nn.ReLU()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "leaky":
        return nn.LeakyReLU(a.param)
    if kind == "prelu":
        return nn.PReLU(c)
    if kind == "hardtanh":
        return nn.Hardtanh(-a.param, 2 * a.param)
    if kind in ("elu", "celu"):
        return (nn.ELU if kind == "elu" else nn.CELU)(a.param if isinstance(a, Act) else 1.0)
    if kind in _SMOOTH_MODULES:
        return _SMOOTH_MODULES[kind]()
    return nn.Identity()


_SMOOTH_MODULES = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "selu": nn.SELU,
                   "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
                   "mish": nn.Mish, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid}


def _layers(layers, c: int):
    """nn.Sequential of `layers` for `c` input channels, and the output channel count."""
    mods = []
    for l in layers:
        if isinstance(l, Conv):
            m = nn.Conv2d(c, l.out, l.k, l.stride, l.pad, l.dil, l.groups, l.bias)
            m.sign = l.sign
            mods.append(m)
            c = l.out
        elif isinstance(l, BN):
            mods.append(nn.BatchNorm2d(c))
        elif isinstance(l, Act):
            mods.append(_act(l, c))
        elif isinstance(l, MaxPool):
            mods.append(nn.MaxPool2d(l.k, l.stride, l.pad, l.dil, ceil_mode=l.ceil))
        elif isinstance(l, AvgPool):
            mods.append(nn.AvgPool2d(l.k, l.stride, l.pad, ceil_mode=l.ceil, count_include_pad=l.include_pad))
        elif isinstance(l, Residual):
            branch, _ = _layers(l.branch, c)
            short = None
            if l.shortcut is not None:
                short, _ = _layers((l.shortcut,), c)
            mods.append(_Residual(branch, short, l.op))
        elif isinstance(l, Concat):
            subs = []
            out = 0
            for br in l.branches:
                m, cc = _layers(br, c)
                subs.append(m)
                out += cc
            mods.append(_Concat(subs))
            c = out
        elif isinstance(l, Affine):
            mods.append(_Affine(l.kind, l.value, c))
        elif isinstance(l, Pad):
            mods.append(_Fn(lambda x, p=l.pads: F.pad(x, p)))
        elif isinstance(l, Slice):
            mods.append(_Fn(lambda x, a=l.c0, b=l.c1: x[:, a:b]))
            c = l.c1 - l.c0
        elif isinstance(l, Dropout):
            mods.append(nn.Dropout(0.5))
        elif isinstance(l, CastRoundTrip):
            mods.append(_Fn(lambda x: x.double().to(x.dtype)))
        elif isinstance(l, Upsample):
            ac = True if l.align else (False if l.mode == "bilinear" else None)
            if l.by_size:
                mods.append(_Fn(lambda x, l=l, ac=ac: F.interpolate(
                    x, size=(x.shape[2] * l.scale, x.shape[3] * l.scale), mode=l.mode, align_corners=ac)))
            else:
                mods.append(nn.Upsample(scale_factor=l.scale, mode=l.mode, align_corners=ac))
        elif isinstance(l, ConvT):
            mods.append(nn.ConvTranspose2d(c, l.out, l.k, l.stride, l.pad, l.outpad, l.groups, l.bias, l.dil))
            c = l.out
        elif isinstance(l, MaxMin):
            branch, _ = _layers((l.branch,), c)
            mods.append(_MaxMin(branch, l.op))
        elif isinstance(l, Abs):
            mods.append(_Fn(torch.abs))
        elif isinstance(l, Move):
            mods.append(_Fn(_MOVES[l.kind]))
            c = move_shape((c, 4, 4), l)[0]
        elif isinstance(l, GlobalMax):
            mods.append(nn.AdaptiveMaxPool2d(1))
        elif isinstance(l, SE):
            mods.append(_SE(c, l))
        elif isinstance(l, Glu):
            mods.append(_Glu(l.gate, c))
            c //= 2
        else:
            raise TypeError(l)
    return nn.Sequential(*mods), c


def _head(head: Head, shape) -> nn.Module:
    c, h, w = shape
    if head.kind == "conv_gap":
        conv = nn.Conv2d(c, head.classes, 1)
        return nn.Sequential(conv, _act(head.act, head.classes), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    pre = {"flatten": [nn.Flatten()], "gap": [nn.AdaptiveAvgPool2d(1), nn.Flatten()],
           "mean": [_Fn(lambda x: x.mean((2, 3)))], "matmul": [nn.Flatten()]}[head.kind]
    n_in = c * h * w if head.kind in ("flatten", "matmul") else c
    width = head.hidden or head.classes
    first = _MatMul(n_in, width) if head.kind == "matmul" else nn.Linear(n_in, width)
    mods = pre + [first]
    if head.hidden:
        mods += [_act(head.act, head.hidden), nn.Linear(head.hidden, head.classes)]
    return nn.Sequential(*mods)


class FuzzNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        self.body, _ = _layers(spec.body, spec.in_shape[0])
        self.body.eval()
        with torch.no_grad():
            shape = self.body(torch.zeros(1, *spec.in_shape)).shape[1:]
        self.head = _head(spec.head, tuple(shape))
        self.softmax = spec.head.softmax
        self.opset = spec.opset

    def logits(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        y = self.logits(x)
        return torch.softmax(y, 1) if self.softmax else y


def build(spec: NetSpec) -> FuzzNet:
    """The torch module of a spec, with seeded weights of both signs and random BN statistics."""
    net = FuzzNet(spec)
    g = torch.Generator().manual_seed(spec.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, _MatMul)):
                wt = m.w if isinstance(m, _MatMul) else m.weight
                fan_in = wt.shape[0] if isinstance(m, _MatMul) else wt[0].numel()
                sign = getattr(m, "sign", "mixed")
                new = randn(*wt.shape) * math.sqrt(2.0 / fan_in)
                if sign != "mixed":     # one-signed weights do not cancel: keep their sum O(1)
                    new = new.abs() * math.sqrt(2.0 / fan_in) * (1 if sign == "positive" else -1)
                wt.copy_(new)
                bias = m.b if isinstance(m, _MatMul) else m.bias
                if bias is not None:
                    bias.copy_(randn(*bias.shape) * 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(randn(n) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 3 - 1.5)
                m.bias.copy_(randn(n) * 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return net.eval()


def export_spec(spec: NetSpec, batch: int = 2) -> tuple[FuzzNet, onnx.ModelProto]:
    """Build and export (TorchScript, dynamic batch, input 'input', output 'logits')."""
    net = build(spec)
    x = torch.zeros(batch, *spec.in_shape)
    return net, export(net, x, keep_bn=spec.keep_bn, opset=spec.opset)


class _CeluAsElu(nn.Module):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * F.elu(x / self.alpha)


def _celu_as_elu(net: nn.Module) -> nn.Module:
    """`net` with each CELU replaced by α·Elu(x/α) (in place)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.CELU):
                setattr(parent, name, _CeluAsElu(child.alpha))
    return net


def export_exact(spec: NetSpec, net: FuzzNet, model: onnx.ModelProto, batch: int = 2) -> onnx.ModelProto:
    """The export whose constants are the module's own, for the float64 check: with BatchNorm
    kept as a node (the TorchScript exporter otherwise folds it into the Conv in float32, 1e-7
    off the float64 module, which would flip the masks of pre-activations that close to 0);
    and with each CELU written as α·Elu(x/α), what canonicalization rewrites it into (ONNX
    defines Celu for float32 only: cast to float64 it fails the checker)."""
    bn = _has_bn(spec.body) and not spec.keep_bn
    celu = "celu" in _act_kinds(spec.body)
    if not (bn or celu):
        return model
    if celu:
        net = _celu_as_elu(copy.deepcopy(net))
    return export(net, torch.zeros(batch, *spec.in_shape), keep_bn=bn or spec.keep_bn, opset=spec.opset)


def _act_kinds(layers) -> list:
    """Every activation kind in `layers`, branches, SE and GLU (their gates included)."""
    kinds = []
    for l in layers:
        if isinstance(l, Act):
            kinds.append(l.kind)
        elif isinstance(l, Residual):
            kinds += _act_kinds(l.branch)
        elif isinstance(l, Concat):
            for b in l.branches:
                kinds += _act_kinds(b)
        elif isinstance(l, SE):
            kinds += [l.act.kind, l.gate]
        elif isinstance(l, Glu):
            kinds.append(l.gate)
    return kinds


def _has_clip(layers) -> bool:
    """A saturating activation whose saturated value reaches the layers' output (an SE's inner
    activation is followed by a Conv; its gate, a HardSigmoid, multiplies the output)."""
    for l in layers:
        if (isinstance(l, Act) and l.kind in CLIPS) or \
                (isinstance(l, (SE, Glu)) and l.gate in CLIPS) or \
                (isinstance(l, Residual) and _has_clip(l.branch)) or \
                (isinstance(l, Concat) and any(_has_clip(b) for b in l.branches)):
            return True
    return False


# layers that move a saturated value off a kink (BatchNorm and the constant affine ops map equal
# values of a channel to equal values: they keep a tie, and only its value is then rounded)
_MIXING = (Conv, ConvT)
_TIE_KEEPING = (BN, Affine)


def _is_clip(l) -> bool:
    return _has_clip([l])


def _is_kink(l) -> bool:
    """A kink or a max: piecewise activation, abs, max/min, max pooling."""
    return (isinstance(l, Act) and l.kind in PIECEWISE) or isinstance(l, (Abs, MaxMin, MaxPool, GlobalMax))


def _is_smooth(l) -> bool:
    """A smooth activation or a gate."""
    return isinstance(l, (SE, Glu)) or any(k in SMOOTH for k in _act_kinds([l]))


def _reached_before_mix(layers, hit) -> bool:
    """A layer `hit` reached before any weighted layer (at the top level of `layers`)."""
    for l in layers:
        if isinstance(l, _MIXING):
            return False
        if hit(l):
            return True
    return False


def _leaves(layers, state: bool, hit) -> bool:
    """Whether the output of a layer `hit` leaves `layers` with no weighted layer after it
    (`state`: whether it entered them so)."""
    for l in layers:
        if isinstance(l, _MIXING):
            state = False
        elif hit(l):
            state = True
    return state


def _has_relu(layers) -> bool:
    """A Relu-type activation (exact zeros) whose output reaches the layers' output."""
    return any(k in ("relu", "relu6", "hardtanh") for k in _act_kinds(
        [l for l in layers if not isinstance(l, (SE, Glu))]))


def _zeros_shifted(layers, state: tuple) -> tuple:
    """(zeros, shifted, tie): a Relu's exact zeros leave `layers` with no weighted layer after them;
    a BatchNorm or constant affine op moved them off 0 (one value per channel, rounded in the
    reference); and such values reached a max (max pooling, max/min of a branch)."""
    zeros, shifted, tie = state
    for l in layers:
        if isinstance(l, _MIXING):
            zeros = shifted = False
        elif isinstance(l, _TIE_KEEPING):
            shifted = shifted or zeros
        elif isinstance(l, (MaxMin, MaxPool, GlobalMax)):
            tie = tie or shifted
        elif _has_relu([l]):
            zeros, shifted = True, False
    return zeros, shifted, tie


def _has_bn(layers) -> bool:
    for l in layers:
        if isinstance(l, BN) or (isinstance(l, Residual) and _has_bn(l.branch)) or \
                (isinstance(l, Concat) and any(_has_bn(b) for b in l.branches)):
            return True
    return False


def _f32(v: float) -> float:
    return float(np.float32(v))


def reference_module(net: FuzzNet) -> nn.Module:
    """A float64 copy of `net` that computes what the exported file computes, for tests/reference:
    each `_MatMul` (x @ w + b, exported as MatMul + Add, which canonicalization makes one linear
    op) becomes the nn.Linear it is; LeakyReLU's slope, ELU's α, BatchNorm's eps,
    SELU's α and γ (the Selu op's defaults), HardSigmoid's slope 1/6 and, below opset 20, GELU's
    √2 (a Constant of the exported erf subgraph) are rounded to float32,
    as ONNX stores those attributes (SELU's and HardSigmoid's as module attributes the reference
    reads, with a forward that uses them: 1/6 in float32 is 1e-8 off); Softplus loses its
    threshold (ONNX's Softplus has none: torch's x above 20 is 2e-9 off). CELU becomes
    α·Elu(x/α), as canonicalization rewrites it (onnxruntime's CUDA provider has no Celu): one
    Elu between two constant Muls, whose ε-rule SplitLRP applies (the reference's CELU, one
    activation, would pass relevance through unchanged)."""
    twin = _celu_as_elu(copy.deepcopy(net)).double().eval()
    for m in twin.modules():
        if isinstance(m, nn.LeakyReLU):
            m.negative_slope = _f32(m.negative_slope)
        if isinstance(m, nn.ELU):
            m.alpha = _f32(m.alpha)
        if isinstance(m, nn.Softplus):
            m.threshold = math.inf
        if isinstance(m, nn.SELU):
            m.alpha, m.scale = _f32(SELU_ALPHA), _f32(SELU_SCALE)
            m.forward = lambda x, a=m.alpha, s=m.scale: s * F.elu(x, a)
        if isinstance(m, nn.GELU) and m.approximate == "none" and net.opset < 20:
            # below opset 20 the erf form is exported as Div(x, √2 in float32), Erf, Add, Mul, Mul
            m.divisor = _f32(math.sqrt(2.0))
            m.forward = lambda x, s=m.divisor: 0.5 * x * (1.0 + torch.erf(x / s))
        if isinstance(m, nn.Hardsigmoid):
            m.alpha, m.beta = _f32(1.0 / 6.0), 0.5
            m.forward = lambda x, a=m.alpha, b=m.beta: (a * x + b).clamp(0.0, 1.0)
        if isinstance(m, nn.BatchNorm2d):
            m.eps = _f32(m.eps)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _MatMul):
                lin = nn.Linear(*child.w.shape, dtype=torch.float64)
                with torch.no_grad():
                    lin.weight.copy_(child.w.T)
                    lin.bias.copy_(child.b)
                setattr(parent, name, lin)
    return twin


def input_for(spec: NetSpec, batch: int, dtype=np.float64, ties: bool = False) -> np.ndarray:
    """Standard normal data; with `ties`, 1/4 exact zeros and 1/4 copies of one value."""
    rng = np.random.default_rng(spec.seed + 1)
    x = rng.standard_normal((batch, *spec.in_shape)).astype(dtype)
    if ties:
        flat = x.reshape(-1)
        flat[rng.choice(flat.size, flat.size // 4, replace=False)] = 0.0
        idx = rng.choice(flat.size, flat.size // 4, replace=False)
        flat[idx] = flat[idx[0]]
    return x


def products(spec: NetSpec) -> int:
    """The products of two data tensors in the body (SE and GLU gates)."""
    return sum(isinstance(l, (SE, Glu)) for l in spec.body)


def body_mixes_pair_sums(spec: NetSpec) -> bool:
    """A smooth activation or a product in the body: its backward adds a term proportional to the
    pair sums δp + δn to the pair differences (the same for g and h only while their pair sums are
    equal, docs/method.md), so in the "sum" Relu mode, where a Relu behind it makes them differ,
    δpp − δnp − δpn + δnn is no gradient (as with "dc" pooling). The head's activation follows
    every body Relu, so its pair sums are still equal."""
    return any(k in SMOOTH for k in _act_kinds(spec.body))


def relu_only(spec: NetSpec) -> bool:
    """Every activation is a Relu: then ties at 0 follow one convention (relu'(0) = 0) in torch
    and in dconnx. (Clip's autograd passes the gradient at its bounds; dconnx's canonical
    Relu(x − a) − Relu(x − b) does not at a: a tie convention, not an error. Nor a max/min of a
    branch: tied inputs tie it (x = 0 = conv x without bias), and torch.maximum splits the
    gradient of a tie evenly where dconnx's b + Relu(a − b) gives it to b.)"""
    return all(k == "relu" for k in _act_kinds(spec.body)) and spec.head.act in ("relu", "none") and \
        not any(isinstance(l, MaxMin) for l in spec.body)


# ----------------------------------------------------------------------------- reference


def explained_name(model: onnx.ModelProto) -> str:
    """The logits the maps explain: the first output, or the input of a trailing Softmax."""
    out = model.graph.output[0].name
    prod = next((n for n in model.graph.node if out in n.output), None)
    if prod is not None and prod.op_type in ("Softmax", "LogSoftmax"):
        return prod.input[0]
    return out


def _eval(node, ins, env):
    """onnx_torch's op, plus the activations it lacks."""
    a = onnx_torch._attrs(node)
    if node.op_type == "PRelu":
        return torch.where(ins[0] > 0, ins[0], ins[0] * ins[1])     # torch's prelu'(0) = slope
    if node.op_type == "LeakyRelu":
        return F.leaky_relu(ins[0], a.get("alpha", 0.01))
    return onnx_torch._eval(node, ins, a, env)


def graph_autograd(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray):
    """(explained logits, d logits[target] / d input) of an ONNX graph, by torch autograd
    through tests/onnx_torch.py's op implementations in the graph's own precision."""
    env = {t.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(t))) for t in model.graph.initializer}
    xt = torch.tensor(x, requires_grad=True)
    env[model.graph.input[0].name] = xt
    for node in model.graph.node:
        ins = [env[i] if i else None for i in node.input]
        outs = _eval(node, ins, env)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for name, val in zip(node.output, outs):
            if name:
                env[name] = val
    f = env[explained_name(model)]
    f.gather(1, torch.as_tensor(target, dtype=torch.long)[:, None]).sum().backward()
    grad = xt.grad.numpy() if xt.grad is not None else np.zeros_like(x)
    return f.detach().numpy(), grad
