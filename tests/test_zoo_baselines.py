"""Gradient and Gradient×Input equal autograd on every zoo model, both exporters.

Named to run after tests/test_zoo.py, whose exports (session cache `zoo_dir`) it reuses and
which checks that each export computes the torch module's logits. VGG16 is checked in float64
(at 64x64) in tests/test_baselines.py instead.

Two checks per model (tests/regions.py says why a float32 map is never compared with another
computation across ReLU kinks: DenseNet121's float32 maps differed by 1.3e-2 from torch's on
one CPU and not on another):
* float64: the model converted in float64, evaluated with tests/onnx_torch.py, equals torch
  autograd through the original graph in float64 (RTOL64);
* float32: onnxruntime's float32 maps equal the float64 evaluation of the same converted graph
  in onnxruntime's own activation pattern (RTOL32).
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import dconnx
import onnx_torch
import zoo
from dconnx.passes.optimize import prune
from dconnx.precision import cast_model
from helpers import THREADS, rel_err
from regions import float32_and_same_region_float64, onnx_autograd

torch.set_num_threads(THREADS)

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

RTOL32 = 1e-4
RTOL64 = 1e-9


def _params():
    for name in zoo.NAMES:
        if name == "vgg16":
            continue
        for exporter in zoo.EXPORTERS:
            marks = [pytest.mark.slow] if name == "resnet50" else []
            yield pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}")


def _maps_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Only the maps are compared: drop the split forward's g/h outputs (faster sessions)."""
    keep = [o for o in model.graph.output if o.name not in ("g", "h")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    prune(model, ["target", "alpha"])
    return model


@pytest.mark.parametrize("name,exporter", list(_params()))
def test_gradient_and_gradxinput_equal_autograd(name, exporter, zoo_model):
    x = torch.randn((2, *zoo.input_size(name)), generator=torch.Generator().manual_seed(5)).numpy()
    x64 = x.astype(np.float64)
    target = np.array([3, 7])
    original = onnx.load(str(zoo_model(name, exporter)))

    original64 = cast_model(original, TensorProto.DOUBLE)
    del original
    g = onnx_autograd(original64, x64, target)
    model64 = _maps_only(dconnx.convert(original64, methods="gradient,gradxinput").model)
    ours = onnx_torch.run(model64, {"input": x64, "target": target})
    assert rel_err(ours["gradient"], g.sum(1)) < RTOL64
    assert rel_err(ours["gradxinput"], (g * x64).sum(1)) < RTOL64
    del model64, ours

    model = _maps_only(dconnx.convert(cast_model(original64, TensorProto.FLOAT),
                                      methods="gradient,gradxinput").model)
    out32, same_region64 = float32_and_same_region_float64(model, {"input": x, "target": target})
    for key in ("gradient", "gradxinput"):
        assert rel_err(out32[key], same_region64[key]) < RTOL32, key
