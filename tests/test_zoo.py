"""The test model zoo exports, loads and runs: ONNX Runtime (CPU) matches torch.

For every architecture and both exporters: export once (cached in zoo_dir),
check the file's IR version / opset / interface, run at batch 4 and batch 1
(the batch dimension is dynamic) and compare to the torch logits.
A per-model timing table (export, ORT session creation, torch + ORT runs, in
seconds; export is ~0 when the cache already held the model, the torch run is
the first exporter's, once per architecture) and the op types of each export are
printed in the terminal summary.
"""
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import zoo

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

SLOW = {"vgg16", "resnet50"}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def torch_logits():
    """name -> [(input, torch logits)] at batch 4 and 1, computed once for both exporters."""
    cache = {}

    def get(name):
        if name not in cache:
            model = zoo.build(name)
            gen = torch.Generator().manual_seed(123)
            cache[name] = []
            for batch in (4, 1):
                x = torch.randn((batch, *zoo.input_size(name)), generator=gen)
                with torch.no_grad():
                    cache[name].append((x.numpy(), model(x).numpy()))
        return cache[name]
    return get


def _params():
    for name in zoo.NAMES:
        for exporter in zoo.EXPORTERS:
            marks = [pytest.mark.slow] if name in SLOW else []
            yield pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}")


@pytest.mark.parametrize("name,exporter", list(_params()))
def test_export_matches_torch(name, exporter, zoo_model, torch_logits, record_property):
    t0 = time.perf_counter()
    path = zoo_model(name, exporter)
    t_export = time.perf_counter() - t0

    proto = onnx.load(str(path), load_external_data=False)
    assert proto.ir_version <= zoo.MAX_IR_VERSION
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset <= zoo.MAX_OPSET
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "batch dimension is not dynamic"
    if exporter == "dynamo":
        # the dynamo exporter's default: weights in external data beside the model
        assert path.with_name(path.name + ".data").is_file()
        assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)

    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    for x, ref in torch_logits(name):
        batch = len(x)
        (out,) = sess.run(["logits"], {"input": x})
        assert out.shape == ref.shape
        rel = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
        assert rel < REL_TOL, f"{name}/{exporter} batch {batch}: relative error {rel:.3g}"
    t_run = time.perf_counter() - t0
    # printed in the terminal summary by tests/conftest.py
    record_property("zoo_timing", f"{name:20s} {exporter:11s} {t_export:7.2f} {t_load:7.2f} "
                                  f"{t_run:7.2f}  {' '.join(zoo.op_types(path))}")


def test_build_is_deterministic_and_bn_randomized():
    a, b = zoo.build("tiny_cnn", seed=3), zoo.build("tiny_cnn", seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = zoo.build("tiny_cnn", seed=4)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    a.requires_grad_(False)
    bn = a.features[1]
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert float(bn.running_var.min()) >= 0.5 and float(bn.running_var.max()) <= 2.0
    assert float(bn.weight.min()) >= 0.5 and float(bn.weight.max()) <= 1.5
    assert not torch.allclose(a.features[0].bias, torch.zeros_like(a.features[0].bias))


def test_exported_is_cached(tmp_path):
    p1 = zoo.exported("tiny_cnn", "torchscript", tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = zoo.exported("tiny_cnn", "torchscript", tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    assert zoo.exported("tiny_cnn", "torchscript", tmp_path, seed=1) != p1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temp dirs left


def test_unknown_name_and_exporter():
    with pytest.raises(ValueError):
        zoo.build("alexnet")
    with pytest.raises(ValueError):
        zoo.exported("tiny_cnn", "tf2onnx", "/nonexistent")
