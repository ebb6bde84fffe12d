"""Gated torchvision nets convert exactly: EfficientNet-B0 (SiLU, sigmoid SE gates), MobileNetV3
small and large (Hardswish, hardsigmoid SE gates), RegNetY-400MF (sigmoid SE gates) and a small
SE-ResNet built here, random weights and randomized BatchNorm statistics (tests/zoo.py), exported
with both exporters.

* float32 through onnxruntime: g − h = the logits, SplitGrad at α = 0.5 = ½ the float64 torch
  autograd input gradient, SplitCAM and SplitLRP = the independent float64 reference
  (tests/reference), each within a tolerance scaled by the measured float32 error of the
  forward (ORT logits vs float64 torch);
* float64 (the export cast to double, run by tests/onnx_torch.py): the three maps against the
  reference, within a tolerance scaled by the measured deviation of that run's logits from the
  float64 module (the exporters fold BatchNorm into float32 weights; MobileNetV3's hardsigmoid
  keeps 1/6 as a float32 attribute);
* the SE-ResNet exported from a float64 module (exact weights): every map to 1e-9.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import dconnx
import onnx_torch
import zoo
from helpers import THREADS, export, rel_err, run
from precision import to_float64
from reference import dc_reference as ref

TORCHVISION = ("efficientnet_b0", "mobilenet_v3_small", "mobilenet_v3_large", "regnet_y_400mf")
NAMES = TORCHVISION + ("se_resnet",)
EXPORTERS = ("torchscript", "dynamo")
SIZE = 32              # every net downsamples by 32: the last feature map is 1x1
METHODS = "splitgrad,splitcam,splitlrp"
HEADS = (("splitgrad", ref.splitgrad), ("splitcam", ref.splitcam), ("splitlrp", ref.splitlrp))
EPS32 = float(np.finfo(np.float32).eps)


class SEBlock(nn.Module):
    """A BasicBlock with a squeeze-excitation gate (ReLU, sigmoid) before the residual add."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.se = torchvision.ops.SqueezeExcitation(cout, max(cout // 4, 2))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.se(self.b2(self.c2(self.relu(self.b1(self.c1(x))))))
        return self.relu(y + (x if self.down is None else self.down(x)))


class SEResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(SEBlock(8, 8, 1), SEBlock(8, 16, 2), SEBlock(16, 24, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def build(name, seed=0):
    torch.manual_seed(seed)
    m = SEResNet() if name == "se_resnet" else getattr(torchvision.models, name)(weights=None, num_classes=10)
    zoo._randomize(m, seed)
    return m.eval()


class _Cache:
    def __init__(self):
        self.d = {}

    def get(self, key, make):
        if key not in self.d:
            self.d[key] = make()
        return self.d[key]


@pytest.fixture(scope="session")
def gated():
    torch.set_num_threads(THREADS)
    cache = _Cache()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    def module(name):
        return cache.get(("module", name), lambda: build(name))

    def exported(name, exporter):
        return cache.get(("export", name, exporter), lambda: export(module(name), x, exporter=exporter))

    def reference(name):
        def make():
            m = module(name).double()
            xd = x.double().requires_grad_(True)
            f = m(xd)
            target = f.detach().argmax(1)
            (grad,) = torch.autograd.grad(f.gather(1, target[:, None]).sum(), xd)
            res = ref.run(m, x.double(), target=target, alpha=0.5)
            m.float()
            return f.detach().numpy(), grad.numpy(), res
        return cache.get(("ref", name), make)

    return x, module, exported, reference


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_float32_onnxruntime(name, exporter, gated):
    x, module, exported, reference = gated
    f64, grad, res = reference(name)
    conv = dconnx.convert(exported(name, exporter), methods=METHODS).model
    out = run(conv, x.numpy(), target=res.target.numpy(), alpha=np.array(0.5, np.float32))
    f = out["logits"]
    err_f = max(rel_err(f, f64), EPS32)            # the float32 error of the forward, measured
    assert err_f < 1e-4
    scale = np.abs(f).max()
    assert np.abs(out["g"] - out["h"] - f).max() <= 8 * EPS32 * (np.abs(out["g"]).max() + np.abs(out["h"]).max())
    assert np.abs(out["g"] - out["h"] - f64).max() <= 10 * err_f * scale
    # the backward crosses the same layers as the forward: its float32 error is of the same order
    assert rel_err(out["splitgrad"], 0.5 * grad.sum(1)) <= 100 * err_f
    assert rel_err(out["splitcam"], ref.splitcam(res, "input").numpy()) <= 100 * err_f
    # the ε-rule divides by stream values: rounding is amplified where they are small (measured
    # 1e3 to 6e3 times the forward's error on these nets in float32)
    assert rel_err(out["splitlrp"], ref.splitlrp(res, "input").numpy()) <= 3e4 * err_f
    for name_ in ("splitgrad", "splitcam", "splitlrp"):
        assert np.ptp(out[name_]) > 0


@pytest.mark.parametrize("name", TORCHVISION)
def test_float64_matches_reference(name, gated):
    x, module, exported, reference = gated
    f64, grad, res = reference(name)
    conv = dconnx.convert(to_float64(exported(name, "torchscript")), methods=METHODS).model
    out = onnx_torch.run(conv, {"input": x.double().numpy(), "target": res.target.numpy(), "alpha": np.array(0.5)})
    dev = max(rel_err(out["logits"], f64), 1e-15)      # float32 weights (folded BatchNorm), float32 attributes
    assert dev < 1e-6
    assert rel_err(out["g"] - out["h"], out["logits"]) < 1e-12
    assert rel_err(out["g"], res.g.numpy()) <= 100 * dev
    assert rel_err(out["splitgrad"], ref.splitgrad(res, "input").numpy()) <= 100 * dev
    assert rel_err(out["splitcam"], ref.splitcam(res, "input").numpy()) <= 100 * dev
    assert rel_err(out["splitlrp"], ref.splitlrp(res, "input").numpy()) <= 3e4 * dev


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_se_resnet_float64_exact(exporter, gated):
    """Exported from the float64 module: weights exact, so the maps equal the reference's to 1e-9
    (the conventions agree: curvature split, polarization, α-shift points, SplitLRP's rules)."""
    x, module, exported, reference = gated
    f64, grad, res = reference("se_resnet")
    m = build("se_resnet").double()
    conv = dconnx.convert(export(m, x.double(), exporter=exporter), methods=METHODS).model
    out = onnx_torch.run(conv, {"input": x.double().numpy(), "target": res.target.numpy(), "alpha": np.array(0.5)})
    assert rel_err(out["logits"], f64) < 1e-12
    assert rel_err(out["g"], res.g.numpy()) < 1e-12 and rel_err(out["h"], res.h.numpy()) < 1e-12
    assert rel_err(out["splitgrad"], 0.5 * grad.sum(1)) < 1e-9
    for name, head in HEADS:
        assert rel_err(out[name], head(res, "input").numpy()) < 1e-9, name
