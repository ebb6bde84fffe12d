"""Options whose values no other test compares: the Relu tie convention (ties="strict" | "geq")
and the per-layer Frobenius α (alpha_mode="frobenius"), each against the independent float64
reference (tests/reference) on the torch module: streams, the four sensitivities, SplitLRP
relevance and the three heads, at the input and at a hidden layer.

Both sides run in float64 (the module is exported in double, the converted graph runs in
tests/onnx_torch.py), so the tolerance is tight. (The unfolded-BatchNorm Frobenius α, with
the node's own eps, is tested with the normalization op rules.)
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import dconnx
import onnx_torch
from helpers import export, rel_err
from reference import dc_reference as ref

TIGHT = 1e-9
HIDDEN = "2"          # the tensor entering the second Conv: the first Relu's output
KEYS = ["input", HIDDEN]
METHODS = "splitgrad,splitcam,splitlrp"


def _convert(module, x, **opts):
    model = export(module, torch.tensor(x), keep_bn=opts.pop("keep_bn", False))
    return dconnx.convert(model, methods=METHODS, layer=HIDDEN, expose=KEYS, **opts).model


def _check(out, res, x):
    """The converted graph's outputs against a reference result, quantity by quantity."""
    assert rel_err(out["g"], res.g.numpy()) < TIGHT and rel_err(out["h"], res.h.numpy()) < TIGHT
    for key in KEYS:
        p, n = res.streams[key]
        assert rel_err(out[f"{key}::p"], p.numpy()) < TIGHT, (key, "p")
        assert rel_err(out[f"{key}::n"], n.numpy()) < TIGHT, (key, "n")
        for i, name in enumerate(("dpp", "dnp", "dpn", "dnn")):
            assert rel_err(out[f"{key}::{name}"], res.sens[key][i].numpy()) < TIGHT, (key, name)
        rgp, rgn, rhp, rhn = (r.numpy() for r in res.relevance[key])
        assert rel_err(out[f"{key}::Rp"], rgp - rhp) < TIGHT, (key, "Rp")
        assert rel_err(out[f"{key}::Rn"], rgn - rhn) < TIGHT, (key, "Rn")
    for name, head in (("splitgrad", ref.splitgrad), ("splitcam", ref.splitcam), ("splitlrp", ref.splitlrp)):
        want = ref.upsample(head(res, HIDDEN), x.shape[2:]).numpy()
        assert rel_err(out[name], want) < TIGHT, name


# ----------------------------------------------------------------------------- ties

def _tie_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double().eval()


def _tie_input():
    """Normal data with a zero block: bias-free Convs give exact 0 pre-activations inside it."""
    x = np.random.default_rng(4).standard_normal((2, 3, 12, 12))
    x[:, :, 2:9, 3:10] = 0.0
    return x


@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_ties_match_the_reference_and_differ(stabilize):
    net, x = _tie_net(), _tie_input()
    with torch.no_grad():
        pre = net[0](torch.tensor(x))
    assert int((pre == 0).sum()) >= 100, "no exact zeros at the first Relu: the modes would not differ"
    target = np.array([1, 3])
    maps = {}
    for ties in ("strict", "geq"):
        conv = _convert(net, x, ties=ties, stabilize=stabilize)
        out = onnx_torch.run(conv, {"input": x, "target": target, "alpha": np.array(0.35)})
        res = ref.run(net, torch.tensor(x), target=torch.as_tensor(target), alpha=0.35, ties=ties,
                      stabilize=stabilize, layers=KEYS)
        _check(out, res, x)
        maps[ties] = out
    for name in ("splitgrad", "input::dpp", f"{HIDDEN}::dnp"):
        assert rel_err(maps["geq"][name], maps["strict"][name]) > 1e-3, f"ties does not change {name}"


def test_ties_strict_gradient_is_torch_autograd():
    """With 1[x > 0], δpp − δnp − δpn + δnn is torch's gradient (relu'(0) = 0) also at the ties;
    with 1[x ≥ 0] it is not."""
    net, x = _tie_net(), _tie_input()
    target = np.array([1, 3])
    xt = torch.tensor(x, requires_grad=True)
    net(xt).gather(1, torch.as_tensor(target)[:, None]).sum().backward()
    grad = xt.grad.numpy()
    for ties, equal in (("strict", True), ("geq", False)):
        out = onnx_torch.run(_convert(net, x, ties=ties), {"input": x, "target": target})
        recon = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
        assert (rel_err(recon, grad) < TIGHT) == equal, ties


# ----------------------------------------------------------------------------- Frobenius α

def _frobenius_net():
    """Conv + BatchNorm (folded), Conv, Linear, Linear; the folded first Conv scaled to ‖W‖_F = 3
    (α = 1/3), the second Conv to 0.8 (α clamps at 0), the first Linear to 2 (α = 0.25)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.copy_(torch.randn(8) * 0.5)
        bn.running_var.copy_(torch.rand(8) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(8) * 3 - 1.5)
        bn.bias.copy_(torch.randn(8) * 0.5)
        folded = net[0].weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None, None, None]
        net[0].weight.mul_(3.0 / folded.norm())
        net[3].weight.mul_(0.8 / net[3].weight.norm())
        net[7].weight.mul_(2.0 / net[7].weight.norm())
    return net.double().eval()


def _frobenius_alphas(net) -> list:
    """α = max(0, (1 − 1/‖W‖_F)/2) of the shifted weight layers, from the module's parameters:
    the first Conv with its BatchNorm folded in (W·γ/√(var + eps) per output channel), the second
    Conv, the first Linear. The last Linear is the output layer: no shift."""
    bn = net[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weights = [net[0].weight * scale[:, None, None, None], net[3].weight, net[7].weight]
    return [max(0.0, (1.0 - 1.0 / float(w.detach().norm())) / 2.0) for w in weights]


def test_reference_frobenius_alpha_is_the_formula():
    net = _frobenius_net()
    x = torch.tensor(np.random.default_rng(8).standard_normal((2, 3, 8, 8)))
    expected = _frobenius_alphas(net)
    assert expected[1] == 0.0 and min(expected[0], expected[2]) > 0.2     # one clamped, two not
    res = ref.run(net, x, alpha=0.35, alpha_mode="frobenius")
    shifted = [op for op in res.graph.ops if op.shift]
    linear = [res.alphas[op.index] for op in shifted if op.kind == "linear"]
    assert linear == pytest.approx(expected, rel=1e-12, abs=1e-15)
    others = {res.alphas[op.index] for op in shifted if op.kind != "linear"}
    assert others == {0.35}, "Relu and MaxPool keep the global α"


@pytest.mark.parametrize("keep_bn", [True, False], ids=["compiler-folds-bn", "exporter-folds-bn"])
def test_frobenius_matches_the_reference(keep_bn):
    net = _frobenius_net()
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8))
    target = np.array([0, 4])
    conv = _convert(net, x, alpha_mode="frobenius", keep_bn=keep_bn)
    constant = _convert(net, x, keep_bn=keep_bn)
    for alpha in (0.35, 0.5):      # the global α still acts at Relu and MaxPool
        feeds = {"input": x, "target": target, "alpha": np.array(alpha)}
        out = onnx_torch.run(conv, feeds)
        res = ref.run(net, torch.tensor(x), target=torch.as_tensor(target), alpha=alpha,
                      alpha_mode="frobenius", layers=KEYS)
        _check(out, res, x)
        if alpha < 0.5:    # (at 0.5 the Relu shifts zero the pair sums whatever the layers' α)
            plain = onnx_torch.run(constant, feeds)
            for name in ("splitgrad", "splitcam", "input::dpp"):
                assert rel_err(out[name], plain[name]) > 1e-3, f"frobenius does not change {name}"
