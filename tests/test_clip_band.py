"""ReLU6 blocks put back into one Clip (passes/clip_band.py): where the converted graph needs only
the masks of the two Relu pieces of Clip(x, 0, c) = Relu(x) − Relu(x − c), the forward is the
original's Clip again and each cotangent is masked once by float(0 < y < c)."""
import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import dconnx
from helpers import export, rel_err, run, session, torch_grad


class _Net(nn.Module):
    """ReLU6 after a conv and a depthwise conv, Hardtanh(0, 3) after a second conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU6(),
                                      nn.Conv2d(8, 6, 1), nn.Hardtanh(0.0, 3.0))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x):
        return self.head(self.features(x))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    m = _Net()
    bn = m.features[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    # inputs of the clips reach both bounds: scale the weights up
    for conv in (m.features[0], m.features[3], m.features[5]):
        conv.weight.data *= 6.0
    return m.eval().to(dtype)


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _bands(res):
    return [a for p in res.report.passes for a in p.applied if a.startswith("clip bands")]


@pytest.fixture(scope="module")
def exported():
    return export(_net(), torch.zeros(1, 3, 12, 12))


def _x(dtype=np.float32, n=3):
    return np.random.default_rng(1).standard_normal((n, 3, 12, 12)).astype(dtype)


def test_splitgrad_alone_runs_the_original_clips(exported):
    """SplitGrad alone: three Clips (the ReLU6s and the Hardtanh), one band mask each, no Relu
    pieces in the forward; the logits are the original model's to the last bit."""
    res = dconnx.convert(exported, methods="splitgrad")
    assert _bands(res) == ["clip bands: 3 ReLU6-form blocks back to Clip, with one band mask per cotangent"]
    ops = _ops(res.model)
    assert ops["Clip"] == 3 and ops["And"] == 3
    assert ops["Relu"] == 2                         # only g = relu(y) and h = relu(-y) of the logits
    x = _x()
    original = session(exported).run(None, {"input": x})[0]
    assert np.array_equal(run(res.model, x)[exported.graph.output[0].name], original)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.5])
def test_band_equals_the_canonical_pieces(exported, alpha):
    """The same SplitGrad as a conversion that keeps the Relu pieces (SplitLRP reads their
    streams, so the rewrite does not fire there), at every α."""
    x, target = _x(), np.array([0, 3, 4])
    fast = dconnx.convert(exported, methods="splitgrad")
    full = dconnx.convert(exported, methods=("splitgrad", "splitlrp"))
    assert _bands(fast) and not _bands(full) and _ops(full.model)["Clip"] == 0
    a = run(fast.model, x, target=target, alpha=alpha)["splitgrad"]
    b = run(full.model, x, target=target, alpha=alpha)["splitgrad"]
    assert rel_err(a, b) < 1e-5


def test_float64_half_gradient_at_alpha_half():
    """α = 0.5: SplitGrad is half the plain gradient, against float64 torch autograd."""
    net = _net(torch.float64)
    model = export(net, torch.zeros(1, 3, 12, 12, dtype=torch.float64))
    res = dconnx.convert(model, methods="splitgrad")
    assert _bands(res)
    x, target = _x(np.float64), np.array([1, 2, 0])
    got = run(res.model, x, target=target, alpha=0.5)["splitgrad"]
    want = 0.5 * torch_grad(net, x, target).sum(axis=1)
    assert rel_err(got, want) < 1e-12


def _clip_on_input(c: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)), "w")
    fc = numpy_helper.from_array(rng.standard_normal((3, 4)), "fc")
    nodes = [helper.make_node("Clip", ["input", "lo", "hi"], ["y"], name="relu6"),
             helper.make_node("Conv", ["y", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="gemm", transB=1)]
    inits = [w, fc, numpy_helper.from_array(np.array(0.0), "lo"), numpy_helper.from_array(np.array(c), "hi")]
    g = helper.make_graph(nodes, "clip", [helper.make_tensor_value_info("input", TensorProto.DOUBLE, ["N", 2, 3, 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.DOUBLE, ["N", 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_ties_at_both_bounds():
    """At x = 0 and x = c exactly the band mask is 0, as the derivative of PyTorch's ReLU6 and
    Hardtanh; the canonical pieces give 1 at x = c (1[x > 0] − 1[x − c > 0]) and agree elsewhere."""
    c = 6.0
    model = _clip_on_input(c)
    x = np.random.default_rng(2).uniform(-2.0, 8.0, (2, 2, 3, 3))
    x.reshape(-1)[::4] = c
    x.reshape(-1)[1::4] = 0.0
    target = np.array([0, 2])
    fast = run(dconnx.convert(model, methods="splitgrad").model, x, target=target, alpha=0.5)["splitgrad"]
    full = run(dconnx.convert(model, methods=("splitgrad", "splitlrp")).model, x, target=target,
               alpha=0.5)["splitgrad"]
    w = numpy_helper.to_array(model.graph.initializer[0])[:, :, 0, 0]
    fc = numpy_helper.to_array(model.graph.initializer[1])
    per_channel = (fc[target] @ w) / 9.0                     # d logit / d y, per sample and channel
    band = ((x > 0) & (x < c)).astype(np.float64)
    canonical = ((x > 0) & (x <= c)).astype(np.float64)
    assert np.allclose(fast, 0.5 * (band * per_channel[:, :, None, None]).sum(axis=1), rtol=0, atol=1e-13)
    assert np.allclose(full, 0.5 * (canonical * per_channel[:, :, None, None]).sum(axis=1), rtol=0, atol=1e-13)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.relu6(xt).mul(torch.tensor(per_channel)[:, :, None, None]).sum().backward()
    assert np.allclose(fast, 0.5 * xt.grad.numpy().sum(axis=1), rtol=0, atol=1e-13)


def test_not_applied_where_a_mask_has_another_use(exported):
    """SplitCAM at the first ReLU6's output reads that block's streams: it keeps its pieces,
    the later blocks (only masks) are rewritten."""
    layer = next(n.output[0] for n in dconnx.convert(exported, methods="").model.graph.node
                 if n.op_type == "Sub" and "Clip" in n.output[0] and n.output[0].endswith("Clip_output_0"))
    res = dconnx.convert(exported, methods=("splitgrad", "splitcam"), layer=layer)
    applied = _bands(res)
    assert applied and applied[0].startswith("clip bands: 2 ")
    x, target = _x(), np.array([0, 1, 2])
    full = dconnx.convert(exported, methods=("splitgrad", "splitcam", "splitlrp"), layer=layer)
    a, b = run(res.model, x, target=target), run(full.model, x, target=target)
    assert rel_err(a["splitcam"], b["splitcam"]) < 1e-5 and rel_err(a["splitgrad"], b["splitgrad"]) < 1e-5
