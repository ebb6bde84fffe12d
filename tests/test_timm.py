"""timm's HRNet (hrnet_w18_small: parallel branches joined by nearest Resize and Add), random
weights and randomized BatchNorm statistics, with both exporters: float32 g − h against the
logits on onnxruntime, and in float64 (the converted graph run by tests/onnx_torch.py) the
α = 0.5 SplitGrad against ½ torch autograd of the module."""
import numpy as np
import pytest
import torch

import dconnx
import onnx_torch
import zoo
from helpers import export, run, torch_grad

SIZE = 64


@pytest.fixture(scope="module")
def hrnet():
    import timm
    torch.manual_seed(0)
    m = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=10).eval()
    zoo._randomize(m, 0)          # the test zoo's BatchNorm statistics and biases
    return m


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_hrnet_float32_g_minus_h(hrnet, exporter):
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    model = export(hrnet.float(), torch.tensor(x), exporter=exporter)
    assert {"Resize", "Add"} <= {n.op_type for n in model.graph.node}
    out = run(dconnx.convert(model, methods=("splitgrad", "splitcam", "splitlrp")).model, x)
    f = out["logits"]
    assert np.abs(out["g"] - out["h"] - f).max() <= 1e-5 * np.abs(f).max()
    for name in ("splitgrad", "splitcam", "splitlrp"):
        assert out[name].shape == (2, SIZE, SIZE) and np.isfinite(out[name]).all()


def test_hrnet_float64_splitgrad_is_half_the_gradient(hrnet):
    module = hrnet.double()
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE))
    converted = dconnx.convert(export(module, torch.tensor(x)), methods="splitgrad").model
    target = np.array([3])
    out = onnx_torch.run(converted, {"input": x, "target": target, "alpha": np.array(0.5)})
    assert np.abs(out["g"] - out["h"] - out["logits"]).max() <= 1e-12 * np.abs(out["logits"]).max()
    grad = torch_grad(module, x, target).sum(1)
    assert np.abs(grad).max() > 0
    assert np.abs(out["splitgrad"] - 0.5 * grad).max() <= 1e-9 * np.abs(grad).max()
    hrnet.float()
