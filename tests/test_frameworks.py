"""Framework-neutral input (issue #11): models exported from TensorFlow/Keras (tf2onnx) and
JAX/Flax (jax2onnx) convert exactly, with maps in the image's own layout.

The fixtures in models/frameworks/ are built by models/build_framework_fixtures.py in a
separate virtual environment; this file needs neither TensorFlow nor JAX. Each export has a
`<name>.ref.npz` with an NHWC input batch `x`, a `target` per sample, and the framework's own
float64 `logits` for x and float64 input gradient `grad` of logits[i, target[i]];
manifest.json says which file derives from which and what it must do.

What must hold, for every export:
* g − h equals the framework's logits (float32: relative error < 1e-4; in float64 g − h equals
  the graph's own logits to 1e-9, and those the framework's to 1e-6, the float32 rounding of
  the constants the exporters fold);
* SplitGrad at α = 0.5 equals half the framework's input gradient summed over the detected
  channel axis (float32: 1e-4 relative to the largest value; float64: 1e-6), and SplitCAM at
  α = 0.5 half of LayerCAM on the input streams computed from that gradient,
  ReLU(Σ_c ReLU(∇f) ⊙ |x|) (the input enters a Conv, so δpp + δnn = ½∇f there, and p + n = |x|);
* with share_forward=True (the default) g − h = f holds by construction under recentering (the
  difference stream is the original activation): the exactness checks also run with
  share_forward=False, where g and h must equal relu(±f) of the framework's logits;
* the maps are [batch, H, W] over the input's own spatial axes; the detected channel axis
  is reported and recorded as metadata;
* the batch axis stays dynamic; SplitCAM and SplitLRP run and are finite.
A model with stale intermediate value_info converts with a warning; a model whose nodes are
invalid is refused.
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dconnx
import onnx_torch
from dconnx.io import MAX_IR_VERSION, MAX_OPSET
from dconnx.runtime import Explainer
from helpers import rel_err, run
from precision import to_float64

DIR = pathlib.Path(__file__).resolve().parent.parent / "models" / "frameworks"
MANIFEST = json.loads((DIR / "manifest.json").read_text())
FILES = MANIFEST["files"]
EXPORTS = sorted(n for n, d in FILES.items() if "derived_from" not in d)
STALE = sorted(n for n, d in FILES.items() if d.get("stale_value_info"))
INVALID = sorted(n for n, d in FILES.items() if d.get("invalid_node"))
EXACT = EXPORTS + STALE          # every fixture that must convert, with its reference
METHODS = "splitgrad,splitcam,splitlrp"
MAP_NAMES = METHODS.split(",")
ALPHA = 0.5
REL32 = 1e-4                     # float32 run vs the frameworks' float64 references
REL64 = 1e-9                     # float64: g − h vs the converted graph's own logits
REL64_FRAMEWORK = 1e-6           # float64 vs the framework: the files hold float32-folded constants


@functools.cache
def ref(name) -> dict:
    with np.load(DIR / FILES[name]["reference"]) as z:
        return {k: z[k] for k in z.files}


def _full_check_error(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=True)
        return None
    except Exception as e:  # noqa: BLE001
        return str(e)


def _value_info_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and "value_info" in str(w.message)]


@functools.cache
def converted(name, share_forward=True):
    """(model, report, value_info warnings) of one conversion per fixture, mode and session."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = dconnx.compile_model(str(DIR / name), methods=METHODS, share_forward=share_forward)
    return model, report, _value_info_warnings(caught)


def _spatial(x: np.ndarray, channel_axis: int) -> tuple:
    return tuple(d for i, d in enumerate(x.shape) if i not in (0, channel_axis))


def _outputs(name, x, target, share_forward=True):
    model = converted(name, share_forward)[0]
    return run(model, x, target=target, alpha=np.float32(ALPHA))


def _half_layercam(r) -> np.ndarray:
    """½ ReLU(Σ_c ReLU(∇f) ⊙ |x|) from the framework's float64 gradient: SplitCAM at the input
    at α = 0.5 (docs/method.md §4), computed without the converted graph."""
    axis = int(r["channel_axis"])
    x = r["x"].astype(np.float64)
    return 0.5 * np.maximum((np.maximum(r["grad"], 0) * np.abs(x)).sum(axis=axis), 0)


# ----------------------------------------------------------------------------- the fixtures

def test_manifest_lists_every_file():
    on_disk = {p.name for p in DIR.glob("*.onnx")}
    assert on_disk == set(FILES), "models/frameworks/manifest.json is out of date"
    assert EXPORTS and STALE and INVALID
    frameworks = {FILES[n]["framework"].split("/")[0] for n in EXPORTS}
    assert {"tensorflow", "jax"} <= frameworks


@pytest.mark.parametrize("name", sorted(FILES))
def test_fixture_file(name):
    path = DIR / name
    assert path.stat().st_size < 1_000_000
    m = onnx.load(str(path))
    assert m.ir_version <= MAX_IR_VERSION
    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert opset <= MAX_OPSET
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    assert ops == FILES[name]["ops"]
    if name in INVALID:
        return
    r = ref(name)
    (inp,) = m.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[0], "the batch axis is not dynamic"
    assert dims[1:] == list(r["x"].shape[1:]), "the file does not take the reference's NHWC batch"
    assert dims[int(r["channel_axis"])] == 3 and int(r["channel_axis"]) == len(dims) - 1
    assert r["logits"].dtype == np.float64 and r["grad"].dtype == np.float64
    assert r["grad"].shape == r["x"].shape and r["logits"].shape == (len(r["x"]), int(r["n_classes"]))


@pytest.mark.parametrize("name", EXACT)
def test_fixture_runs_in_onnxruntime(name):
    """The exported file itself reproduces the framework (stale value_info or not)."""
    r = ref(name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(DIR / name), so, providers=["CPUExecutionProvider"])
    for rows in (slice(None), slice(0, 1)):
        (out,) = sess.run(None, {sess.get_inputs()[0].name: r["x"][rows]})
        assert rel_err(out, r["logits"][rows]) < REL32


def test_fixtures_carry_the_exporter_patterns():
    """What the exporters emit and the compiler has to handle is in the committed files."""
    nodes = {n: onnx.load(str(DIR / n)).graph for n in EXPORTS}

    def consts(g):
        return {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}

    seen = set()
    for g in nodes.values():
        c = consts(g)
        producer = {o: n for n in g.node for o in n.output}
        first = [n for n in g.node if g.input[0].name in n.input]
        if any(n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 3, 1, 2] for n in first):
            seen.add("NHWC input followed by a Transpose")
        for n in g.node:
            if n.op_type == "Add" and n.input[0] in producer and producer[n.input[0]].op_type == "MatMul" \
                    and n.input[1] in c:
                seen.add("MatMul + Add dense layer")
            if n.op_type == "Mul" and n.input[1] in c and c[n.input[1]].size > 1:
                seen.add("BatchNorm as Mul/Add")
            if n.op_type in ("Squeeze", "Reshape") and n.input[0] in producer:
                seen.add(n.op_type)
            if n.op_type == "Conv":
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                w = c.get(n.input[1])
                if group > 1 and w is not None and w.shape[0] == 2 * group and w.shape[1] == 1:
                    seen.add("depthwise conv, channel multiplier 2")
            if n.op_type in ("Shape", "Gather", "Cast"):
                seen.add(n.op_type)
            if n.op_type == "Max" and any(i in c and np.all(c[i] == 0) for i in n.input):
                seen.add("Max(x, 0)")
    want = {"NHWC input followed by a Transpose", "MatMul + Add dense layer", "BatchNorm as Mul/Add",
            "Squeeze", "Reshape", "depthwise conv, channel multiplier 2", "Shape", "Gather", "Cast",
            "Max(x, 0)"}
    assert want <= seen, f"missing: {sorted(want - seen)}"


# ----------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("share_forward", [True, False])
@pytest.mark.parametrize("name", EXACT)
def test_split_reproduces_framework_logits(name, share_forward):
    r = ref(name)
    out = _outputs(name, r["x"], r["target"], share_forward)
    assert rel_err(out["logits"], r["logits"]) < REL32
    assert rel_err(out["g"] - out["h"], r["logits"]) < REL32
    assert out["g"].min() >= 0 and out["h"].min() >= 0
    # recentered output streams: g = relu(f), h = relu(−f) of the framework's logits
    assert rel_err(out["g"], np.maximum(r["logits"], 0)) < REL32
    assert rel_err(out["h"], np.maximum(-r["logits"], 0)) < REL32


@pytest.mark.parametrize("name", EXACT)
def test_splitgrad_at_half_is_half_the_framework_gradient(name):
    r = ref(name)
    axis = int(r["channel_axis"])
    want = 0.5 * r["grad"].sum(axis=axis)
    out = _outputs(name, r["x"], r["target"])
    assert out["splitgrad"].shape == want.shape
    assert rel_err(out["splitgrad"], want) < REL32
    assert rel_err(out["splitcam"], _half_layercam(r)) < REL32


@functools.cache
def converted64(name, share_forward=True):
    """The fixture cast to float64 (tests/precision.py), then converted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dconnx.convert(to_float64(onnx.load(str(DIR / name))), methods=METHODS,
                              share_forward=share_forward).model


@pytest.mark.parametrize("share_forward", [True, False])
@pytest.mark.parametrize("name", EXACT)
def test_float64_is_exact(name, share_forward):
    """In float64 (torch interpreter) there are no float32 sign flips of pre-activations near 0:
    g − h is the graph's own logits to 1e-9. Against the framework the bound is REL64_FRAMEWORK,
    not 1e-9: the exporters fold constants (tf2onnx: BatchNorm's gamma/sqrt(var + eps)) in
    float32, so the file is the float64 framework model only up to float32 rounding."""
    r = ref(name)
    out = onnx_torch.run(converted64(name, share_forward),
                         {"input": r["x"].astype(np.float64), "target": r["target"],
                          "alpha": np.array(ALPHA, np.float64)})
    assert rel_err(out["g"] - out["h"], out["logits"]) < REL64
    assert rel_err(out["logits"], r["logits"]) < REL64_FRAMEWORK
    assert rel_err(out["g"], np.maximum(r["logits"], 0)) < REL64_FRAMEWORK
    assert rel_err(out["h"], np.maximum(-r["logits"], 0)) < REL64_FRAMEWORK
    assert rel_err(out["splitgrad"], 0.5 * r["grad"].sum(axis=int(r["channel_axis"]))) < REL64_FRAMEWORK
    assert rel_err(out["splitcam"], _half_layercam(r)) < REL64_FRAMEWORK


@pytest.mark.parametrize("name", EXACT)
def test_maps_in_the_inputs_own_layout(name):
    r = ref(name)
    axis = int(r["channel_axis"])
    shape = (len(r["x"]), *_spatial(r["x"], axis))
    model = converted(name)[0]
    declared = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                for o in model.graph.output}
    for m in MAP_NAMES:
        assert declared[m][1:] == list(shape[1:]), (m, declared[m])
        assert isinstance(declared[m][0], str), f"{m}: the batch axis is not dynamic"
    ex = Explainer(model, providers=["CPUExecutionProvider"])
    maps = ex.maps(r["x"], target=r["target"], alpha=ALPHA)
    assert set(maps) == set(MAP_NAMES)
    for m, v in maps.items():
        assert v.shape == shape, (m, v.shape)
        assert np.all(np.isfinite(v)), m
        assert np.abs(v).max() > 0, f"{m} is all zero"
    assert maps["splitcam"].min() >= 0
    assert rel_err(maps["splitcam"], _half_layercam(r)) < REL32     # its values: the framework's gradient


@pytest.mark.parametrize("name", EXACT)
def test_channel_axis_is_detected_and_reported(name):
    axis = int(ref(name)["channel_axis"])
    model, report, _ = converted(name)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta.get("dconnx.channel_axis") == str(axis)
    assert re.search(rf"channel axis\D{{0,12}}\b{axis}\b", report.summary()), report.summary()


@pytest.mark.parametrize("name", EXPORTS)
def test_given_channel_axis_matches_detected(name):
    r = ref(name)
    axis = int(r["channel_axis"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*value_info", category=UserWarning)  # tested below
        model, _ = dconnx.compile_model(str(DIR / name), methods="splitgrad", channel_axis=axis)
    assert {p.key: p.value for p in model.metadata_props}["dconnx.channel_axis"] == str(axis)
    given = run(model, r["x"], target=r["target"], alpha=np.float32(ALPHA))["splitgrad"]
    detected = _outputs(name, r["x"], r["target"])["splitgrad"]
    assert rel_err(given, detected) < 1e-6


@pytest.mark.parametrize("name", EXACT)
def test_dynamic_batch(name):
    r = ref(name)
    model = converted(name)[0]
    (inp,) = [i for i in model.graph.input if i.name == "input"]
    assert inp.type.tensor_type.shape.dim[0].dim_param, "the converted input's batch is not dynamic"
    three = _outputs(name, r["x"], r["target"])
    one = _outputs(name, r["x"][:1], r["target"][:1])
    five = _outputs(name, np.concatenate([r["x"], r["x"][:2]]), np.concatenate([r["target"], r["target"][:2]]))
    for k, v in three.items():
        assert one[k].shape == (1, *v.shape[1:]) and five[k].shape == (5, *v.shape[1:]), k
        scale = np.abs(v).max() + 1e-30
        assert np.abs(one[k][0] - v[0]).max() <= 1e-5 * scale, k
        assert np.abs(five[k][:3] - v).max() <= 1e-5 * scale, k


@pytest.mark.parametrize("name", EXPORTS)
def test_exporter_value_info_warns_only_when_stale(name):
    """A file whose own intermediate value_info fails the full check converts with a warning
    (jax2onnx writes NHWC shapes on NCHW tensors); a clean file converts silently."""
    stale = _full_check_error(onnx.load(str(DIR / name))) is not None
    warned = converted(name)[2]
    assert bool(warned) == stale, (stale, warned)


# ----------------------------------------------------------------------------- broken files

@pytest.mark.parametrize("name", STALE)
def test_stale_value_info_converts_with_a_warning(name, tmp_path):
    raw = onnx.load(str(DIR / name))
    assert _full_check_error(raw) is not None, "the fixture no longer has stale value_info"
    r = ref(name)
    source = FILES[name]["derived_from"]
    with pytest.warns(UserWarning, match="value_info"):
        dconnx.convert(str(DIR / name), tmp_path / "stale.dc.onnx", methods=METHODS)
    model = onnx.load(str(tmp_path / "stale.dc.onnx"))
    assert _full_check_error(model) is None
    out = run(model, r["x"], target=r["target"], alpha=np.float32(ALPHA))
    assert rel_err(out["g"] - out["h"], r["logits"]) < REL32
    clean = _outputs(source, r["x"], r["target"])
    for m in MAP_NAMES:
        assert rel_err(out[m], clean[m]) < 1e-6, m


@pytest.mark.parametrize("name", INVALID)
def test_invalid_nodes_are_refused(name, tmp_path):
    raw = onnx.load(str(DIR / name))
    del raw.graph.value_info[:]
    assert _full_check_error(raw) is not None, "the fixture's nodes are no longer invalid"
    out = tmp_path / "invalid.dc.onnx"
    with pytest.raises(dconnx.InvalidModelError):
        dconnx.convert(str(DIR / name), out, methods=METHODS)
    assert not out.exists() and not list(tmp_path.iterdir())
