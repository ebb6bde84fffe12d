"""torchvision's FCN-ResNet50 and DeepLabV3-ResNet50 (weights=None, weights_backbone=None,
aux_loss=False; random weights and randomized BatchNorm statistics, tests/zoo.py) convert
exactly with both exporters. Their output `out` [batch, 21, H, W] is explained as the target
class summed over the `region` input (docs/method.md, dense outputs).

* float64: each net exported from its float64 module (exact weights: the exporters fold
  BatchNorm in float64), the converted graph run by tests/onnx_torch.py: g − h equals the
  region-summed logit of module.double() to 1e-12 and SplitGrad at α = 0.5 equals ½ its torch
  autograd gradient (summed over channels) to 1e-9.
* float32: the same export cast to float32 (the graph a float32 export gives; one export per
  exporter keeps the file fast), run by onnxruntime: g − h equals the model's own region-summed
  logit to the rounding of the streams (8 ε times their size) and the float64 value within that
  plus 10 times the measured error of the float32 forward; SplitGrad equals the float64
  evaluation of the same graph in onnxruntime's activation pattern (tests/regions.py) to float32
  rounding. (Compared with autograd directly, float32 ReLU sign flips make the difference depend
  on the CPU's kernels: 1e-6 here, 1e-2 measured for FCN at 64×64.)
* the heads' export idioms one at a time, on a small net in float64 against torch: the bilinear
  resize to a size read from a Shape subgraph (the batch axis dynamic), the ASPP pooling branch
  (a global average pool resized back from 1×1), dilated convolutions, and the TorchScript
  exporter's opset 11 Resize (empty constants for the roi and scales it has no other way to leave
  out); a zero-size float constant anywhere else is still refused.

At 32×40 the backbones' output stride 8 leaves 4×5 feature maps: layer4's dilation-4 taps
reach across the 5 columns; the ASPP rates (12, 24, 36) see only their centre taps.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper

import dconnx
import onnx_torch
import peak_rss
import zoo
from dconnx.errors import InvalidModelError
from dconnx.precision import cast_model
from helpers import export, rel_err, run
from regions import float32_and_same_region_float64

NAMES = ("fcn_resnet50", "deeplabv3_resnet50")
H, W = 32, 40
EPS32 = float(np.finfo(np.float32).eps)
RTOL32 = 1e-4
TARGET = np.array([3, 17])


class Out(nn.Module):
    """torchvision's segmentation models return {"out": ...}: the tensor alone."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, aux_loss=False)
    zoo._randomize(net, seed)
    return Out(net).eval()


def _region(n: int, h: int, w: int) -> np.ndarray:
    """A box in the first sample, a disc in the second (float64; cast where needed)."""
    r = np.zeros((n, h, w))
    r[0, 3:h // 2 + 5, w // 4:w - 3] = 1
    yy, xx = np.mgrid[:h, :w]
    r[1:] = ((yy - 0.6 * h) ** 2 + (xx - 0.4 * w) ** 2 < (0.35 * min(h, w)) ** 2)
    return r


def region_logit_and_grad(module, x: np.ndarray, target, region):
    """(the target class summed over the region, its autograd gradient wrt the input), in x's dtype."""
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    s = (y * torch.as_tensor(region, dtype=xt.dtype)[:, None])[torch.arange(len(x)), torch.as_tensor(target)]
    s = s.sum((1, 2))
    (grad,) = torch.autograd.grad(s.sum(), xt)
    return s.detach().numpy(), grad.numpy()


def _feeds(x, target, region, alpha=0.5):
    return {"input": x, "target": np.asarray(target, np.int64), "alpha": np.array(alpha, x.dtype),
            "region": region.astype(x.dtype)}


# -- the two nets, both exporters -----------------------------------------------------------------
# torchscript first: the dynamo exporter leaves memory behind that the later cases then sit on
CASES = [(n, e) for e in zoo.EXPORTERS for n in NAMES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{e}" for n, e in CASES])
def case(request):
    """Everything a case's tests read, computed once; the models are dropped before the tests run."""
    name, exporter = request.param
    module = build(name).double()
    x = np.random.default_rng(1).standard_normal((2, 3, H, W))
    region = _region(2, H, W)
    s64, grad64 = region_logit_and_grad(module, x, TARGET, region)
    onx = export(module, torch.tensor(x), exporter=exporter)
    del module
    peak_rss.release_freed_memory()
    res = {"name": name, "exporter": exporter, "s64": s64, "grad64": grad64}

    converted = dconnx.convert(onx, methods="splitgrad")
    onx = cast_model(onx, TensorProto.FLOAT)       # the float64 export is no longer needed
    res["notes"] = converted.report.notes
    res["out64"] = onnx_torch.run(converted.model, _feeds(x, TARGET, region))
    del converted

    converted = [dconnx.convert(onx, methods="splitgrad").model]
    del onx
    # handed over, not kept: the check frees the model before its float64 evaluation
    res["out32"], res["same64"] = float32_and_same_region_float64(
        converted.pop(), _feeds(x.astype(np.float32), TARGET, region))
    peak_rss.release_freed_memory()
    return res


@pytest.mark.slow
def test_float64_exact(case):
    out, s64, grad64 = case["out64"], case["s64"], case["grad64"]
    assert any("dense output" in n for n in case["notes"])
    assert out["g"].shape == out["h"].shape == (2, 21) and out["splitgrad"].shape == (2, H, W)
    assert rel_err((out["g"] - out["h"])[[0, 1], TARGET], s64) < 1e-12
    assert rel_err(out["splitgrad"], 0.5 * grad64.sum(1)) < 1e-9
    assert np.abs(grad64).max() > 0


@pytest.mark.slow
def test_float32_onnxruntime(case):
    out, same, s64 = case["out32"], case["same64"], case["s64"]
    region = _region(2, H, W)
    gh = (out["g"].astype(np.float64) - out["h"])[[0, 1], TARGET]
    own = (out["logits"].astype(np.float64)[[0, 1], TARGET] * region).sum((1, 2))
    err_f = max(rel_err(own, s64), EPS32)       # the float32 error of the forward, measured
    assert err_f < 1e-4
    streams = np.abs(out["g"]).max() + np.abs(out["h"]).max()
    assert np.abs(gh - own).max() <= 8 * EPS32 * streams        # measured 0.13 of it
    assert np.abs(gh - s64).max() <= 10 * err_f * np.abs(s64).max() + 8 * EPS32 * streams
    assert rel_err(out["splitgrad"], same["splitgrad"]) < RTOL32
    assert np.ptp(out["splitgrad"]) > 0


# -- the heads' export idioms on a small net ------------------------------------------------------
class MiniDeepLab(nn.Module):
    """A strided stem, a dilated residual stage, ASPP (1×1, dilated 3×3, global pool resized back
    to the feature size), a 1×1 class head, bilinear resize to the input size: DeepLabV3's
    head in miniature (FCN's is the resize alone)."""

    def __init__(self, k=3, w=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.dil = nn.Sequential(nn.Conv2d(w, w, 3, padding=2, dilation=2), nn.ReLU(),
                                 nn.Conv2d(w, w, 3, padding=3, dilation=3))
        self.a1 = nn.Sequential(nn.Conv2d(w, w, 1), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(w, w, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(w),
                                nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w, w, 1), nn.ReLU())
        self.head = nn.Conv2d(3 * w, k, 1)

    def forward(self, x):
        f = self.stem(x)
        f = F.relu(f + self.dil(f))
        p = F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(torch.cat([self.a1(f), self.a2(f), p], 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


EXPORTS = [("torchscript", 17), ("torchscript", 11), ("dynamo", 18)]


@pytest.mark.parametrize("exporter,opset", EXPORTS, ids=[f"{e}{o}" for e, o in EXPORTS])
def test_head_idioms_float64(exporter, opset):
    torch.manual_seed(0)
    module = MiniDeepLab()
    zoo._randomize(module, 0)
    module = module.double().eval()
    h, w = 12, 10
    x = np.random.default_rng(3).standard_normal((2, 3, h, w))
    onx = export(module, torch.tensor(x), exporter=exporter, opset=opset)
    ops = {n.op_type for n in onx.graph.node}
    assert "Resize" in ops and "Shape" in ops and ops & {"GlobalAveragePool", "ReduceMean"}
    conv = dconnx.convert(onx, methods="splitgrad").model
    region = _region(2, h, w)
    target = np.array([0, 2])
    s64, grad64 = region_logit_and_grad(module, x, target, region)
    out = run(conv, x, target=target, alpha=0.5, region=region)
    assert rel_err((out["g"] - out["h"])[[0, 1], target], s64) < 1e-12
    assert rel_err(out["splitgrad"], 0.5 * grad64.sum(1)) < 1e-10
    # the batch axis stays dynamic: one sample alone gives its row
    one = run(conv, x[1:], target=target[1:], alpha=0.5, region=region[1:])
    assert rel_err(one["splitgrad"][0], out["splitgrad"][1]) < 1e-12


def _resize11(read_by_add: bool) -> onnx.ModelProto:
    """Resize-11 by 2 with its roi an empty Constant (how the TorchScript exporter writes it);
    with read_by_add the empty constant also feeds an Add."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Constant", [], ["roi"], value=helper.make_tensor("v", f, [0], [])),
             helper.make_node("Constant", [], ["scales"],
                              value=helper.make_tensor("s", f, [4], [1, 1, 2, 2])),
             helper.make_node("Resize", ["input", "roi", "scales"], ["r"], mode="linear"),
             helper.make_node("Flatten", ["r"], ["logits"])]
    if read_by_add:
        nodes.insert(2, helper.make_node("Add", ["roi", "roi"], ["roi2"]))
    g = helper.make_graph(nodes, "resize11", [helper.make_tensor_value_info("input", f, ["batch", 2, 3, 4])],
                          [helper.make_tensor_value_info("logits", f, ["batch", 96])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return model


def test_empty_resize_operands_are_accepted_and_other_empty_tensors_refused():
    x = np.random.default_rng(4).standard_normal((2, 2, 3, 4)).astype(np.float32)
    conv = dconnx.convert(_resize11(False), methods="splitgrad").model
    want = F.interpolate(torch.tensor(x, dtype=torch.float64), scale_factor=2, mode="bilinear")
    out = run(conv, x, target=np.array([5, 90]), alpha=0.5)
    assert rel_err(out["g"] - out["h"], want.flatten(1).numpy()) < 1e-6
    with pytest.raises(InvalidModelError, match="zero-size"):
        dconnx.convert(_resize11(True), methods="splitgrad")
