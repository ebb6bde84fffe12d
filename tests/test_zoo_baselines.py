"""Gradient and Gradient×Input equal torch autograd on every zoo model, both exporters.

Named to run after tests/test_zoo.py, whose exports (session cache `zoo_dir`) it
reuses. VGG16 is checked in float64 (at 64x64) in tests/test_baselines.py instead: with
random weights at 224x224 its float32 gradient is ill-conditioned (torch's own
float32 gradient is ~7% off its float64 one).
"""
import numpy as np
import pytest
import torch

import dconnx
import zoo
from dconnx.passes.optimize import prune
from helpers import rel_err, run, torch_grad

torch.set_num_threads(2)

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

RTOL32 = 1e-4


def _params():
    for name in zoo.NAMES:
        if name == "vgg16":
            continue
        for exporter in zoo.EXPORTERS:
            marks = [pytest.mark.slow] if name == "resnet50" else []
            yield pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}")


@pytest.mark.parametrize("name,exporter", list(_params()))
def test_gradient_and_gradxinput_equal_autograd(name, exporter, zoo_model):
    x = torch.randn((2, *zoo.input_size(name)), generator=torch.Generator().manual_seed(5)).numpy()
    target = np.array([3, 7])
    model = dconnx.convert(str(zoo_model(name, exporter)), methods="gradient,gradxinput").model
    # only the maps are compared: drop the split forward's g/h outputs (faster sessions)
    keep = [o for o in model.graph.output if o.name not in ("g", "h")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    prune(model, ["target", "alpha"])
    out = run(model, x, target=target)
    g = torch_grad(zoo.build(name), x, target)
    assert rel_err(out["gradient"], g.sum(1)) < RTOL32
    assert rel_err(out["gradxinput"], (g * x).sum(1)) < RTOL32
