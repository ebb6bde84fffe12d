"""float16 conversion: the graph computes in half, callers feed and read float32; the maps
agree with float32 in the bulk (measured, not pasted: rank correlation and relative error)."""
from pathlib import Path

import numpy as np

import dconnx
from dconnx.eval.synthetic import make_dataset
from dconnx.runtime import Explainer
from helpers import rel_err

MODEL = Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx"


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    return np.corrcoef(ra, rb)[0, 1]


def test_float16_model_agrees_with_float32():
    methods = "splitgrad,splitcam,splitlrp,gradient"
    half = Explainer(dconnx.convert(MODEL, methods=methods, layer=10, precision="float16"))
    full = Explainer(dconnx.convert(MODEL, methods=methods, layer=10))
    x, _, _ = make_dataset(8, seed=1)
    a, b = half(x, alpha=0.4), full(x, alpha=0.4)
    assert a["logits"].dtype == np.float32
    assert rel_err(a["logits"], b["logits"]) < 1e-2
    assert np.array_equal(a["logits"].argmax(1), b["logits"].argmax(1))
    for m in ("splitgrad", "splitcam", "splitlrp", "gradient"):
        assert _spearman(a[m], b[m]) > 0.99, m
    for m in ("splitcam", "splitlrp"):
        assert rel_err(a[m], b[m]) < 2e-2, m
    # the file: float16 weights, float32 interface
    model = dconnx.convert(MODEL, methods="splitgrad", precision="float16").model
    assert model.graph.input[0].type.tensor_type.elem_type == 1
    assert any(t.data_type == 10 for t in model.graph.initializer)
