"""Smooth and kinked activations by the curvature split (dconnx/ops/smooth.py).

Each activation on a small conv net, in float64 (onnx.reference) unless noted:
(1) g − h equals the model's own logits, streams and g, h never negative, both
stabilizations; (2) SplitGrad at α = 0.5 is ½ torch autograd's input gradient;
(3) at α = 0 SplitGrad, g and h equal an independent torch float64 stream network
written from the convex rule (four-product linear layers, the curvature split's
constants derived here by bisection on finite-difference curvature), whose
autograd gives ½(∂g/∂p + ∂h/∂n); (4) with stabilize "none", g and h are convex
along random segments while f is not, and nondecreasing in the input streams.
"""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import helper

import dconnx
from helpers import export, run, torch_grad

# float32-exact parameters, so that the ONNX attributes equal torch's values
ACTS = {
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "softplus": lambda: nn.Softplus(),
    "elu": lambda: nn.ELU(alpha=0.75),
    "elu_kinked": lambda: nn.ELU(alpha=1.75),
    "selu": lambda: nn.SELU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "mish": lambda: nn.Mish(),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
}
ACTS.update({
    # activations that the torchscript exporter writes as subgraphs, fused by the compiler:
    # x·Sigmoid(x), Div → Erf → Add → Mul → Mul, x·Tanh(Softplus(x))
    "silu_subgraph": lambda: nn.SiLU(),
    "gelu_subgraph": lambda: nn.GELU(),
    "mish_subgraph": lambda: nn.Mish(),
})
# the dynamo exporter emits the Gelu and Mish ops
EXPORTER = {"gelu": "dynamo", "gelu_tanh": "dynamo", "mish": "dynamo"}


class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.a1, self.a2 = act(), act()
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        y = self.a2(self.c2(self.a1(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def _net(name, seed=0):
    torch.manual_seed(seed)
    m = Net(ACTS[name]).double().eval()
    with torch.no_grad():
        for c in (m.c1, m.c2):
            c.bias.normal_(0, 0.5)
    return m


def _x(n=2, seed=1, scale=2.0):
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)) * scale


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            m = _net(name)
            cache[name] = (m, export(m, torch.tensor(_x()), exporter=EXPORTER.get(name, "torchscript"),
                                     opset=17 if name.endswith("_subgraph") else 18))
        return cache[name]
    return get


def _attribute_rounding(module, out, x) -> float:
    """How far the ONNX model's own float64 logits are from torch's, relative: ONNX stores
    activation parameters as float32 attributes (SELU's constants, HardSigmoid's 1/6), and
    onnx.reference evaluates function ops (Gelu) with float32 constants. The streams carry the
    same relative deviation."""
    f = module(torch.tensor(x)).detach().numpy()
    return float(np.abs(out["logits"] - f).max() / np.abs(f).max())


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_g_minus_h_and_half_gradient(name, stabilize, models):
    module, model = models(name)
    x = _x()
    conv = dconnx.convert(model, methods=("splitgrad", "splitlrp"), stabilize=stabilize,
                          share_forward=False, alpha=0.5).model
    out = run(conv, x)
    f = out["logits"]
    out["target"] = f.argmax(1)
    scale = np.abs(f).max() + np.abs(out["g"]).max()
    assert np.abs(out["g"] - out["h"] - f).max() <= (1e-12 + 100 * _attribute_rounding(module, out, x)) * scale
    assert out["g"].min() >= 0 and out["h"].min() >= 0
    assert np.allclose(f, module(torch.tensor(x)).detach().numpy(), rtol=1e-6, atol=1e-7)
    grad = torch_grad(module, x, out["target"]).sum(1)
    assert np.abs(out["splitgrad"] - 0.5 * grad).max() <= 1e-6 * np.abs(grad).max()
    assert np.abs(grad).max() > 0


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "hardswish", "elu_kinked"])
def test_float32_onnxruntime(name):
    """The same in float32 through onnxruntime (what a user runs)."""
    m = _net(name).float()
    x = _x().astype(np.float32)
    conv = dconnx.convert(export(m, torch.tensor(x)), methods=("splitgrad",), alpha=0.5).model
    out = run(conv, x)
    out["target"] = out["logits"].argmax(1)
    assert np.abs(out["g"] - out["h"] - out["logits"]).max() <= 1e-5 * (np.abs(out["logits"]).max() + 1)
    grad = torch_grad(m.double(), x.astype(np.float64), out["target"]).sum(1)
    assert np.abs(out["splitgrad"] - 0.5 * grad).max() <= 1e-4 * np.abs(grad).max()


# -- an independent float64 stream network -----------------------------------------------
def _torch_phi(name):
    act = ACTS[name]().double()
    return lambda u: act(u)


def _slope(phi, u):
    u = torch.tensor([float(u)], dtype=torch.float64, requires_grad=True)
    phi(u).sum().backward()
    return float(u.grad)


# kinks are not seen by a second derivative: the convex interval of the kinked functions
# from their definitions (Elu/Selu with alpha > 1 bend down at 0; HardSwish at -3 and 3;
# HardSigmoid (x/6 + 1/2 clipped) at 3)
KINKED = {"elu_kinked": (-math.inf, 0.0), "selu": (-math.inf, 0.0), "hardswish": (-3.0, 3.0),
          "hardsigmoid": (-math.inf, 3.0)}


def _curvatures(phi, us):
    """φ'' at each point (elementwise φ: one autograd pass for all points)."""
    u = torch.as_tensor(np.asarray(us, dtype=np.float64)).requires_grad_()
    d1, = torch.autograd.grad(phi(u).sum(), u, create_graph=True)
    d2, = torch.autograd.grad(d1.sum(), u)
    return d2.detach().numpy()


def _curvature(phi, u):
    return float(_curvatures(phi, [u])[0])


def _convex_interval(name, phi):
    """[lo, hi] where φ'' ≥ 0 (autograd's second derivative, sign changes refined by bisection)."""
    if name in KINKED:
        return KINKED[name]
    grid = np.linspace(-8, 8, 1601)
    sign = _curvatures(phi, grid) >= 0
    changes = np.flatnonzero(sign[1:] != sign[:-1])
    assert np.count_nonzero(np.diff(sign.astype(int)) == 1) <= 1, "one convex interval"
    lo, hi = -math.inf, math.inf
    for i in changes:
        root = _bisect(lambda u: _curvature(phi, u) >= 0, grid[i], grid[i + 1])
        if sign[i]:
            hi = root
        else:
            lo = root
    return lo, hi


def _bisect(pred, a, b):
    pa = pred(a)
    for _ in range(60):
        mid = 0.5 * (a + b)
        if pred(mid) == pa:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


class StreamAct:
    """The convex rule applied to φ₁ and φ₂ = φ₁ − φ, constants from the function itself."""

    def __init__(self, name):
        self.phi = _torch_phi(name)
        lo, hi = _convex_interval(name, self.phi)
        far = 60.0
        s_minus, s_plus = _slope(self.phi, -far), _slope(self.phi, far)
        with torch.no_grad():
            L = float(self.phi(torch.tensor([-far], dtype=torch.float64))) - s_minus * -far
        self.lo, self.hi = lo, hi
        self.s_lo = s_minus if lo == -math.inf else _slope(self.phi, lo + 1e-12)
        self.s_hi = s_plus if hi == math.inf else _slope(self.phi, hi - 1e-12)
        if lo == -math.inf:
            self.p1, self.p2 = (s_minus, self.s_hi, L), (0.0, 0.0, 0.0)
        else:
            c01 = float(self.phi(torch.tensor([lo], dtype=torch.float64))) - self.s_lo * lo
            self.p1, self.p2 = (self.s_lo, self.s_hi, c01), (self.s_lo - s_minus, 0.0, c01 - L)
        if hi != math.inf:
            self.p2 = (self.p2[0], self.s_hi - s_plus, self.p2[2])

    def phi1(self, u):
        if not (math.isfinite(self.lo) or math.isfinite(self.hi)):
            return self.phi(u)
        v = self.phi(torch.clamp(u, self.lo if math.isfinite(self.lo) else None,
                                 self.hi if math.isfinite(self.hi) else None))
        if math.isfinite(self.hi):
            v = v + self.s_hi * torch.relu(u - self.hi)
        if math.isfinite(self.lo):
            v = v - self.s_lo * torch.relu(self.lo - u)
        return v

    @staticmethod
    def convex_rule(q, m, M, c0, P, N):
        x = P - N
        psi = q - m * x
        Pq = max(m, 0) * P + max(-m, 0) * N + (psi - c0) + (M - m) * N + max(c0, 0)
        Nq = max(m, 0) * N + max(-m, 0) * P + (M - m) * N + max(-c0, 0)
        return Pq, Nq

    def __call__(self, P, N):
        x = P - N
        q1 = self.phi1(x)
        P1, N1 = self.convex_rule(q1, *self.p1, P, N)
        P2, N2 = self.convex_rule(q1 - self.phi(x), *self.p2, P, N)
        return P1 + N2, N1 + P2


def _stream_linear(P, N, op):
    """The four-product rule of a signed linear op (op(z, weight_variant, bias_variant))."""
    return op(P, "pos", "pos") + op(N, "neg", None), op(P, "neg", "neg") + op(N, "pos", None)


def _variant(t, v):
    return None if t is None or v is None else (t.clamp(min=0) if v == "pos" else (-t).clamp(min=0))


def stream_net(m, name, p, n):
    act = StreamAct(name)

    def conv(c):
        return lambda z, wv, bv: torch.nn.functional.conv2d(z, _variant(c.weight, wv), _variant(c.bias, bv),
                                                            padding=1)
    P, N = _stream_linear(p, n, conv(m.c1))
    P, N = act(P, N)
    P, N = _stream_linear(P, N, conv(m.c2))
    P, N = act(P, N)
    P, N = P.mean((2, 3)), N.mean((2, 3))
    fc = lambda z, wv, bv: torch.nn.functional.linear(z, _variant(m.fc.weight, wv), _variant(m.fc.bias, bv))  # noqa: E731
    return _stream_linear(P, N, fc)


@pytest.mark.parametrize("name", list(ACTS))
def test_streams_and_splitgrad_match_an_independent_stream_network(name, models):
    module, model = models(name)
    x = _x()
    conv = dconnx.convert(model, methods=("splitgrad",), stabilize="none", share_forward=False, alpha=0.0,
                          expose=["input"]).model
    out = run(conv, x)
    out["target"] = out["logits"].argmax(1)
    xt = torch.tensor(x)
    p, n = xt.clamp(min=0).requires_grad_(), (-xt).clamp(min=0).requires_grad_()
    with torch.no_grad():
        module_params = module
    G, H = stream_net(module_params, name, p, n)
    k = torch.as_tensor(out["target"]).long()[:, None]
    g, h = G.gather(1, k).squeeze(1), H.gather(1, k).squeeze(1)
    scale = float(G.abs().max())
    tol = (1e-9 + 100 * _attribute_rounding(module, out, x)) * scale
    assert np.abs(out["g"] - G.detach().numpy()).max() <= tol
    assert np.abs(out["h"] - H.detach().numpy()).max() <= tol
    dgp, dgn = torch.autograd.grad(g.sum(), (p, n), retain_graph=True)
    dhp, dhn = torch.autograd.grad(h.sum(), (p, n))
    ref = (0.5 * (dgp + dhn)).sum(1).numpy()
    assert np.abs(out["splitgrad"] - ref).max() <= 1e-7 * np.abs(ref).max()
    # the four sensitivities (the full layout: SplitCAM's), each half a partial of g or h
    for key, d in (("dpp", dgp), ("dnp", dgn), ("dpn", dhp), ("dnn", dhn)):
        half = 0.5 * d.numpy()
        assert np.abs(out[f"input::{key}"] - half).max() <= 1e-7 * np.abs(half).max(), key


# -- convexity and monotonicity on the converted model -------------------------------------
def _as_stream_inputs(conv: onnx.ModelProto) -> onnx.ModelProto:
    """The converted model with its input streams `input::p`, `input::n` as graph inputs
    (only g and h kept as outputs), so that g and h can be evaluated at any streams."""
    m = onnx.ModelProto()
    m.CopyFrom(conv)
    g = m.graph
    streams = ("input::p", "input::n")
    keep = [nd for nd in g.node if not set(nd.output) & set(streams)]
    del g.node[:]
    g.node.extend(keep)
    like = g.input[0]
    for s in streams:
        vi = helper.make_tensor_value_info(s, like.type.tensor_type.elem_type,
                                           [d.dim_param or d.dim_value for d in like.type.tensor_type.shape.dim])
        g.input.append(vi)
    outs = [o for o in g.output if o.name in ("g", "h")]
    del g.output[:]
    g.output.extend(outs)
    return m


@pytest.mark.parametrize("name", list(ACTS))
def test_g_and_h_convex_and_monotone_f_not_convex(name, models):
    _, model = models(name)
    conv = dconnx.convert(model, methods=(), stabilize="none", share_forward=False, maxpool="dc",
                          expose=["input"]).model
    rng = np.random.default_rng(7)
    ts = np.linspace(-1.0, 1.0, 41)
    f_bends = [False, False]
    for seg in range(6):
        x0, v = rng.standard_normal((1, 3, 6, 6)) * 2, rng.standard_normal((1, 3, 6, 6)) * 2
        xs = x0 + ts[:, None, None, None] * v
        out = run(conv, xs)
        for key in ("g", "h"):
            y = out[key]
            second = y[:-2] - 2 * y[1:-1] + y[2:]
            assert second.min() >= -1e-9 * (np.abs(y).max() + 1), (key, seg)
        second_f = out["logits"][:-2] - 2 * out["logits"][1:-1] + out["logits"][2:]
        tol = 1e-6 * (np.abs(out["logits"]).max() + 1)
        f_bends[0] |= bool((second_f < -tol).any())
        f_bends[1] |= bool((second_f > tol).any())
    assert all(f_bends), "f should bend both ways along some segment (else the test cannot fail)"
    # nondecreasing in the input streams
    streams = _as_stream_inputs(conv)
    x = rng.standard_normal((4, 3, 6, 6))
    p, n = np.maximum(x, 0), np.maximum(-x, 0)
    base = run(streams, x, **{"input::p": p, "input::n": n})
    for _ in range(3):
        dp, dn = rng.uniform(0, 0.5, p.shape), rng.uniform(0, 0.5, n.shape)
        up = run(streams, x, **{"input::p": p + dp, "input::n": n + dn})
        for key in ("g", "h"):
            assert (up[key] - base[key]).min() >= -1e-9 * (np.abs(base[key]).max() + 1), key


def test_sum_mode_does_not_reconstruct_the_gradient_behind_a_smooth_activation():
    """docs/method.md: the `sum` Relu mode keeps δpp − δnp − δpn + δnn = ∇f only in a network of
    piecewise-linear ops: a Relu in `sum` mode leaves the pair sums of g and h unequal, and the
    curvature split's backward of the SiLU before it mixes them into the difference (measured
    2.3 at α = 0). `standard` keeps it on the same net (so the check can tell)."""
    from op_cases import Head
    torch.manual_seed(0)
    module = Head(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                nn.Flatten(), nn.Linear(256, 5))).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = export(module, torch.tensor(x))
    grad = None
    err = {}
    for mode in ("standard", "sum"):
        out = run(dconnx.convert(model, methods="splitgrad", relu_backward=mode, expose=["input"]).model, x,
                  alpha=0.0)
        if grad is None:
            grad = torch_grad(module, x, out["logits"].argmax(1))
        recon = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
        err[mode] = np.abs(recon - grad).max() / np.abs(grad).max()
    assert err["standard"] < 1e-4
    assert err["sum"] > 1e-2, err
