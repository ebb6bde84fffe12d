"""The bundled trained fixture model (models/fixture_cnn.onnx) and its synthetic data."""
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dconnx.eval.synthetic import CLASS_NAMES, denormalize, make_dataset

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
ONNX_PATH = MODELS / "fixture_cnn.onnx"
META_PATH = MODELS / "fixture_cnn.json"
N_CHECK = 500


@pytest.fixture(scope="module")
def meta():
    return json.loads(META_PATH.read_text())


@pytest.fixture(scope="module")
def test_set(meta):
    d = meta["dataset"]
    return make_dataset(N_CHECK, size=d["size"], n_classes=d["n_classes"], seed=d["test_seed"],
                        clutter=d["clutter"])


def test_file_is_small_and_loadable():
    assert ONNX_PATH.stat().st_size < 10 * 1024 * 1024
    proto = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 13
    assert all(o.version <= 26 for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_batchnorm_nodes_are_kept():
    proto = onnx.load(str(ONNX_PATH))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") >= 1, "the fixture must keep BN unfolded"
    assert "MaxPool" in ops and "Relu" in ops and "Gemm" in ops
    overlapping = [n for n in proto.graph.node if n.op_type == "MaxPool"
                   and onnx.helper.get_attribute_value(
                       next(a for a in n.attribute if a.name == "kernel_shape")) == [3, 3]]
    assert overlapping, "expected a 3x3 stride-2 (overlapping) MaxPool"


def test_metadata_matches_model(meta):
    proto = onnx.load(str(ONNX_PATH))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == meta["input_name"] and out.name == meta["output_name"]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == meta["input_shape"][1:] and isinstance(dims[0], str)  # dynamic batch
    assert meta["class_names"] == list(CLASS_NAMES[:meta["dataset"]["n_classes"]])
    assert meta["test_accuracy"] >= 0.95


def test_accuracy_on_regenerated_test_set(meta, test_set):
    x, y, _ = test_set
    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run([meta["output_name"]], {meta["input_name"]: x[i:i + 100]})[0]
                             for i in range(0, len(x), 100)])
    assert logits.shape == (len(x), meta["dataset"]["n_classes"])
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.95, f"fixture accuracy {acc:.3f} on {len(x)} regenerated test images"
    # batch 1 gives the same logits (dynamic batch)
    one = sess.run(None, {meta["input_name"]: x[:1]})[0]
    np.testing.assert_allclose(one, logits[:1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- synthetic data
def test_make_dataset_shapes_and_determinism():
    x, y, m = make_dataset(300, size=48, n_classes=5, seed=7)
    assert x.shape == (300, 3, 48, 48) and x.dtype == np.float32
    assert y.shape == (300,) and y.dtype == np.int64 and set(np.unique(y)) <= set(range(5))
    assert m.shape == (300, 48, 48) and m.dtype == bool
    assert m.reshape(300, -1).any(axis=1).all(), "every image has a non-empty object mask"
    assert abs(float(x.mean())) < 0.5 and 0.6 < float(x.std()) < 1.4
    assert 0.0 <= float(denormalize(x).min()) and float(denormalize(x).max()) <= 1.0
    x2, y2, m2 = make_dataset(300, size=48, n_classes=5, seed=7)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(m, m2)
    # a smaller set with the same seed is a prefix; another seed differs
    x3, y3, m3 = make_dataset(20, size=48, n_classes=5, seed=7)
    assert np.array_equal(x3, x[:20]) and np.array_equal(m3, m[:20])
    assert not np.array_equal(make_dataset(20, size=48, n_classes=5, seed=8)[0], x3)


def test_make_dataset_object_contrast():
    # inside the mask the image differs from the rest (planted evidence is visible)
    x, _, m = make_dataset(64, seed=3, clutter=False)
    raw = denormalize(x).mean(axis=1)
    inside = np.array([raw[i][m[i]].mean() for i in range(len(x))])
    outside = np.array([raw[i][~m[i]].mean() for i in range(len(x))])
    assert np.median(np.abs(inside - outside)) > 0.15
