"""Products of two data tensors by polarization (gates: squeeze-excitation, GLU).

x·y = ½[(P+Q)² + (N+R)²] − ½[(P+R)² + (N+Q)²] for x = P − N, y = Q − R. Checked on a
squeeze-excitation block (a [N, C, 1, 1] sigmoid gate broadcast over [N, C, H, W]) and a GLU
(a channel split, one half gating the other), both exporters, in float64: g − h = f, SplitGrad
at α = 0.5 = ½ autograd's gradient, g, h and SplitGrad at α = 0 against an independent torch
stream network, SplitLRP conserving relevance, and with stabilize "none" g and h convex along
segments (f not) and nondecreasing in the input streams.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dconnx
from helpers import export, run, torch_grad
from test_smooth import _as_stream_inputs


class SEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.s1, self.s2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        gate = torch.sigmoid(self.s2(torch.relu(self.s1(h.mean((2, 3), keepdim=True)))))
        return self.fc(torch.relu(self.c2(h * gate)).mean((2, 3)))


class GLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(F.glu(self.c1(x), dim=1))).mean((2, 3)))


NETS = {"se": SEBlock, "glu": GLUNet}


def _x(n=2, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)) * 1.5


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, exporter="torchscript"):
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            m = NETS[name]().double().eval()
            cache[(name, exporter)] = (m, export(m, torch.tensor(_x()), exporter=exporter))
        return cache[(name, exporter)]
    return get


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_gate_exact_and_half_gradient(name, exporter, stabilize, models):
    module, model = models(name, exporter)
    assert "Mul" in {n.op_type for n in model.graph.node}
    x = _x()
    conv = dconnx.convert(model, methods=("splitgrad", "splitlrp"), stabilize=stabilize, share_forward=False,
                          alpha=0.5).model
    out = run(conv, x)
    f = out["logits"]
    assert np.allclose(f, module(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    assert np.abs(out["g"] - out["h"] - f).max() <= 1e-12 * (np.abs(out["g"]).max() + 1)
    assert out["g"].min() >= 0 and out["h"].min() >= 0
    grad = torch_grad(module, x, f.argmax(1)).sum(1)
    assert np.abs(out["splitgrad"] - 0.5 * grad).max() <= 1e-10 * np.abs(grad).max()


# -- an independent stream network (four-product linear rule, Relu max rule, polarization) --
def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else (-t).clamp(min=0)


def _lin(P, N, op, w, bias):
    return (op(P, _pos(w), _pos(bias)) + op(N, _neg(w), None), op(P, _neg(w), _neg(bias)) + op(N, _pos(w), None))


def _conv(c, pad):
    return lambda P, N: _lin(P, N, lambda z, w, b: F.conv2d(z, w, b, padding=pad), c.weight, c.bias)


def _relu(P, N):
    return torch.maximum(P, N), N


def _sigmoid(P, N):
    """The curvature split of the sigmoid (convex below 0, concave above; slopes in [0, ¼])."""
    x = P - N
    phi1 = torch.sigmoid(torch.clamp(x, max=0.0)) + 0.25 * torch.relu(x)
    r1, r2 = phi1, phi1 - torch.sigmoid(x)
    return r1 + 0.25 * N + 0.25 * N, 0.25 * N + r2 + 0.25 * N


def _product(a, b):
    (P, N), (Q, R) = a, b
    return 0.5 * ((P + Q) ** 2 + (N + R) ** 2), 0.5 * ((P + R) ** 2 + (N + Q) ** 2)


def stream_net(m, name, p, n):
    if name == "se":
        h = _relu(*_conv(m.c1, 1)(p, n))
        s = tuple(t.mean((2, 3), keepdim=True) for t in h)
        gate = _sigmoid(*_conv(m.s2, 0)(*_relu(*_conv(m.s1, 0)(*s))))
        y = _relu(*_conv(m.c2, 1)(*_product(h, gate)))
    else:
        a = _conv(m.c1, 1)(p, n)
        half = [t.split(4, dim=1) for t in a]
        y = _relu(*_conv(m.c2, 1)(*_product((half[0][0], half[1][0]), _sigmoid(half[0][1], half[1][1]))))
    P, N = (t.mean((2, 3)) for t in y)
    return _lin(P, N, F.linear, m.fc.weight, m.fc.bias)


@pytest.mark.parametrize("name", list(NETS))
def test_streams_and_splitgrad_match_an_independent_stream_network(name, models):
    module, model = models(name)
    x = _x()
    out = run(dconnx.convert(model, methods=("splitgrad",), stabilize="none", share_forward=False,
                             alpha=0.0, expose=["input"]).model, x)
    xt = torch.tensor(x)
    p, n = xt.clamp(min=0).requires_grad_(), (-xt).clamp(min=0).requires_grad_()
    G, H = stream_net(module, name, p, n)
    assert np.abs(out["g"] - G.detach().numpy()).max() <= 1e-10 * float(G.abs().max())
    assert np.abs(out["h"] - H.detach().numpy()).max() <= 1e-10 * float(G.abs().max())
    k = torch.as_tensor(out["logits"].argmax(1))[:, None]
    dgp, dgn = torch.autograd.grad(G.gather(1, k).sum(), (p, n), retain_graph=True)
    dhp, dhn = torch.autograd.grad(H.gather(1, k).sum(), (p, n))
    ref = (0.5 * (dgp + dhn)).sum(1).numpy()
    assert np.abs(out["splitgrad"] - ref).max() <= 1e-9 * np.abs(ref).max()
    for key, d in (("dpp", dgp), ("dnp", dgn), ("dpn", dhp), ("dnn", dhn)):
        half = 0.5 * d.numpy()
        assert np.abs(out[f"input::{key}"] - half).max() <= 1e-9 * np.abs(half).max(), key


@pytest.mark.parametrize("name", list(NETS))
def test_splitlrp_conserves_relevance_through_gates(name, models):
    _, model = models(name)
    x = _x()
    out = run(dconnx.convert(model, methods=("splitlrp",), stabilize="none", lrp_epsilon=1e-12,
                             expose=["input"]).model, x)
    k = out["logits"].argmax(1)
    total = out["g"][np.arange(len(k)), k] - out["h"][np.arange(len(k)), k]
    # relevance lost only to the biases (a bias is a source of its own): measured against the
    # same model without biases, where conservation is exact
    with torch.no_grad():
        module = NETS[name]().double().eval()
        for mod in module.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    out0 = run(dconnx.convert(export(module, torch.tensor(x)), methods=("splitlrp",), stabilize="none",
                              lrp_epsilon=1e-12).model, x)
    k0 = out0["logits"].argmax(1)
    total0 = out0["g"][np.arange(len(k0)), k0] - out0["h"][np.arange(len(k0)), k0]
    assert np.allclose(out0["splitlrp"].reshape(len(k0), -1).sum(1), total0, rtol=1e-8, atol=1e-10)
    assert np.isfinite(out["splitlrp"]).all() and np.abs(total).max() > 0


@pytest.mark.parametrize("name", list(NETS))
def test_g_and_h_convex_and_monotone_f_not_convex(name, models):
    _, model = models(name)
    conv = dconnx.convert(model, methods=(), stabilize="none", share_forward=False, expose=["input"]).model
    rng = np.random.default_rng(3)
    ts = np.linspace(-1.0, 1.0, 41)
    bends = [False, False]
    for seg in range(6):
        x0, v = rng.standard_normal((1, 3, 6, 6)) * 1.5, rng.standard_normal((1, 3, 6, 6)) * 1.5
        out = run(conv, x0 + ts[:, None, None, None] * v)
        for key in ("g", "h"):
            y = out[key]
            assert (y[:-2] - 2 * y[1:-1] + y[2:]).min() >= -1e-9 * (np.abs(y).max() + 1), (key, seg)
        sf = out["logits"][:-2] - 2 * out["logits"][1:-1] + out["logits"][2:]
        tol = 1e-7 * (np.abs(out["logits"]).max() + 1)
        bends[0] |= bool((sf < -tol).any())
        bends[1] |= bool((sf > tol).any())
    assert all(bends)
    streams = _as_stream_inputs(conv)
    x = rng.standard_normal((3, 3, 6, 6))
    p, n = np.maximum(x, 0), np.maximum(-x, 0)
    base = run(streams, x, **{"input::p": p, "input::n": n})
    for _ in range(3):
        up = run(streams, x, **{"input::p": p + rng.uniform(0, 0.5, p.shape),
                                "input::n": n + rng.uniform(0, 0.5, n.shape)})
        for key in ("g", "h"):
            assert (up[key] - base[key]).min() >= -1e-9 * (np.abs(base[key]).max() + 1), key


def test_division_by_data_stays_refused():
    class Div(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return (self.c(x) / (torch.sigmoid(self.c(x)) + 1.0)).mean((2, 3))
    with pytest.raises(dconnx.UnsupportedOpError, match="division by a data-dependent tensor"):
        dconnx.convert(export(Div().eval(), torch.randn(1, 3, 6, 6)))
