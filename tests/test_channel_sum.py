"""A map's channel sum folded into its last products (passes/channel_sum.py): Σ_c Conv(y, W)[c] is
Conv(y, Σ_c W[c]), so the adjoints at the image write one channel instead of three."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import dconnx
import dconnx.passes.optimize as optimize
from helpers import export, rel_err, run, torch_grad


def _net(stride: int, dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 5, stride=stride, padding=2), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return m.eval().to(dtype)


def _summed(res) -> list[str]:
    return [a for p in res.report.passes for a in p.applied if a.startswith("channel sums")]


def _one_channel_products(model) -> int:
    summed = {n.output[0] for n in model.graph.node if n.op_type == "ReduceSum" and n.output[0].endswith("::channel_sum")}
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") and n.input[1] in summed)


@pytest.mark.parametrize("stride", [1, 2], ids=["conv-adjoint", "convtranspose-adjoint"])
@pytest.mark.parametrize("methods", ["splitgrad", "gradient"])
def test_folded_equals_unfolded(monkeypatch, stride, methods):
    """Both products at the image (SplitGrad: |W|ᵀσ and Wᵀ∇f; the gradient: Wᵀ∇f) write one
    channel; the map is the unfolded conversion's at every α."""
    model = export(_net(stride), torch.zeros(1, 3, 16, 16))
    res = dconnx.convert(model, methods=methods)
    want = 2 if methods == "splitgrad" else 1
    assert _summed(res) == [f"channel sums: {want} products of a map's last layer write its channel sum"]
    assert _one_channel_products(res.model) == want
    monkeypatch.setattr(optimize, "fold_channel_sums", lambda m: 0)
    plain = dconnx.convert(model, methods=methods)
    assert not _summed(plain) and _one_channel_products(plain.model) == 0
    x, target = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32), np.array([0, 3, 1])
    for alpha in (0.0, 0.35, 0.5):
        a = run(res.model, x, target=target, alpha=alpha)[methods]
        b = run(plain.model, x, target=target, alpha=alpha)[methods]
        assert a.shape == b.shape == (3, 16, 16)
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_float64_half_gradient_at_alpha_half(stride):
    net = _net(stride, torch.float64)
    res = dconnx.convert(export(net, torch.zeros(1, 3, 16, 16, dtype=torch.float64)), methods="splitgrad")
    assert _summed(res)
    x, target = np.random.default_rng(2).standard_normal((2, 3, 16, 16)), np.array([2, 0])
    got = run(res.model, x, target=target, alpha=0.5)["splitgrad"]
    assert rel_err(got, 0.5 * torch_grad(net, x, target).sum(axis=1)) < 1e-12


def test_not_folded_where_the_map_multiplies_the_input():
    """Gradient × input multiplies each channel by the image before the sum: not a linear chain."""
    res = dconnx.convert(export(_net(1), torch.zeros(1, 3, 16, 16)), methods="gradxinput")
    assert not _summed(res) and _one_channel_products(res.model) == 0
