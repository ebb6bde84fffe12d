"""Which weight-derived tensors a converted model holds (option `weight_variants`), read off the
graph: what onnxruntime folds at session start is every node whose inputs are all constants.
Structural, not a memory measurement (benchmarks/run.py --memory measures the session's RSS)."""
import json
from collections import Counter

import numpy as np
import pytest

import dconnx
from dconnx.runtime import Explainer

ALL3 = "splitgrad,splitcam,splitlrp"
FIXTURE = "models/fixture_cnn.onnx"
pytestmark = pytest.mark.filterwarnings("ignore:splitcam at the input layer")


def folded_weight_tensors(model) -> Counter:
    """The constants computed from a weight (an initializer of rank ≥ 2 that is not a graph
    input) and read by a node the runtime runs, by the chain of ops that computes each:
    what the runtime folds once and holds for the session's lifetime."""
    g = model.graph
    inputs = {i.name for i in g.input}
    weights = {t.name for t in g.initializer if len(t.dims) >= 2 and t.name not in inputs}
    const = {t.name for t in g.initializer if t.name not in inputs}
    chain = {}                               # folded tensor -> ops from a weight, innermost first
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or not ins or not all(i in const for i in ins):
            continue
        const.update(node.output)
        from_weight = [chain.get(i, () if i in weights else None) for i in ins]
        from_weight = [c for c in from_weight if c is not None]
        if from_weight:
            for o in node.output:
                chain[o] = (node.op_type,) + max(from_weight, key=len)
    read = Counter()
    for node in g.node:
        if node.output[0] in chain:
            continue
        for i in node.input:
            if i in chain:
                read["<-".join(chain[i])] += 1
    return read


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_small"])
def test_splitgrad_holds_w_and_abs_w_only(arch, zoo_model, request):
    """SplitGrad needs W and |W|: one |W| per weight layer and no other weight-derived tensor
    (no flipped adjoint kernels, no W⁺, W⁻)."""
    path = request.getfixturevalue("vgg16_small_onnx") if arch == "vgg16_small" else \
        zoo_model(arch, "torchscript")
    model = dconnx.convert(path, methods="splitgrad", weight_variants="session").model
    folded = folded_weight_tensors(model)
    layers = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm") and not n.name.startswith("dc/"))
    assert set(folded) == {"Abs"}, folded
    # each |W| read by its adjoint product (and nothing else)
    assert folded["Abs"] == layers, (folded, layers)


def test_auto_layout_folds_adjoint_kernels_for_splitgrad(zoo_model):
    """The default ("auto"): SplitGrad alone holds W, |W| and the flipped kernels of the stride-1
    convolutions' adjoints (each adjoint a Conv), recorded as "adjoints"; no W⁺, W⁻."""
    model = dconnx.convert(zoo_model("resnet18", "torchscript"), methods="splitgrad").model
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["dconnx.options"])["weight_variants"] == "adjoints"
    folded = folded_weight_tensors(model)
    assert {"Slice<-Transpose", "Abs<-Slice<-Transpose"} <= set(folded), folded
    assert not any(k.startswith("Relu") for k in folded), folded
    stride1 = _stride1_convs(model)
    assert folded["Slice<-Transpose"] + folded["Abs<-Slice<-Transpose"] == 2 * stride1, (folded, stride1)


def _stride1_convs(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and not n.name.startswith("dc/")
               and all(a.name != "strides" or set(a.ints) == {1} for a in n.attribute))


@pytest.mark.parametrize("methods", ["gradient", "guidedbp", "lrp_epsilon", "deeplift", "ig"])
def test_auto_layout_of_the_baselines_holds_one_flipped_w(methods, zoo_model):
    """The gradient baselines, LRP-epsilon, DeepLIFT and IG transpose W alone: "auto" gives them
    the flipped adjoint kernels too, one copy of W per stride-1 convolution and nothing else
    derived from a weight (no |W|, W⁺, W⁻)."""
    model = dconnx.convert(zoo_model("resnet18", "torchscript"), methods=methods).model
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["dconnx.options"])["weight_variants"] == "adjoints"
    folded = folded_weight_tensors(model)
    assert set(folded) == {"Slice<-Transpose"}, folded
    assert folded["Slice<-Transpose"] == _stride1_convs(model), folded


@pytest.mark.parametrize("methods", ["gradient,splitlrp", "lrp_gamma", "lrp_zplus"])
def test_auto_layout_is_session_beside_signed_products(methods, zoo_model):
    """With a head that needs W⁺ᵀ/W⁻ᵀ products (SplitLRP, LRP-gamma, LRP-z+), "auto" is "session":
    no flipped kernels folded, whatever else is converted with it."""
    model = dconnx.convert(zoo_model("resnet18", "torchscript"), methods=methods).model
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["dconnx.options"])["weight_variants"] == "session"
    folded = folded_weight_tensors(model)
    assert not any("Transpose" in k for k in folded), folded


@pytest.mark.parametrize("method", ["gradient", "lrp_epsilon", "deeplift"])
def test_baseline_layouts_compute_the_same_maps(method):
    """A baseline's maps with the flipped kernels ("auto") equal the session layout's to
    float32 rounding."""
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = {mode: Explainer(dconnx.convert(FIXTURE, methods=method, weight_variants=mode).model,
                           providers=["CPUExecutionProvider"])(x, target=[1, 3])[method]
           for mode in ("auto", "session")}
    scale = np.abs(out["session"]).max()
    assert scale > 0
    np.testing.assert_allclose(out["auto"], out["session"], rtol=0, atol=1e-5 * scale)


def test_all_three_heads_hold_no_signed_parts(zoo_model):
    """SplitLRP's W⁺ᵀ, W⁻ᵀ products are half-sums and half-differences of W and |W| products (the
    "auto" layout is "session" with SplitLRP among the heads)."""
    model = dconnx.convert(zoo_model("resnet18", "torchscript"), methods=ALL3).model
    folded = folded_weight_tensors(model)
    assert set(folded) <= {"Abs", "Abs<-Reshape"}, folded   # |W|, and |bias| shaped for a Conv


def test_precomputed_holds_every_variant(zoo_model):
    """The fastest layout, for comparison: flipped adjoint kernels and W⁺ folded at session start."""
    model = dconnx.convert(zoo_model("resnet18", "torchscript"), methods=ALL3,
                           weight_variants="precomputed").model
    folded = folded_weight_tensors(model)
    assert {"Slice<-Transpose", "Abs<-Slice<-Transpose", "Relu<-Slice<-Transpose"} <= set(folded), folded


def test_per_run_folds_nothing_and_computes_the_same_maps():
    """weight_variants="per-run": every weight with a variant is an overridable initializer, so
    nothing computed from it is folded; the outputs equal the session layout's (up to the
    runtime's kernel choice for a non-constant weight: float32 rounding)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    session = dconnx.convert(FIXTURE, methods=ALL3, weight_variants="session").model
    per_run = dconnx.convert(FIXTURE, methods=ALL3, weight_variants="per-run").model
    assert folded_weight_tensors(per_run) == Counter()
    overridable = {i.name for i in per_run.graph.input} & {t.name for t in per_run.graph.initializer}
    weights = {n.input[1] for n in per_run.graph.node if n.op_type in ("Conv", "Gemm") and not n.name.startswith("dc/")}
    assert weights <= overridable
    ex_s = Explainer(session, providers=["CPUExecutionProvider"])
    ex_r = Explainer(per_run, providers=["CPUExecutionProvider"])
    assert ex_r.methods == ex_s.methods and ex_r.input_name == ex_s.input_name
    a, b = ex_s(x, target=[1, 2]), ex_r(x, target=[1, 2])
    assert a.keys() == b.keys()
    for k in a:
        scale = np.abs(a[k]).max()
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * scale, err_msg=k)


def test_the_layouts_compute_the_same_maps():
    """session (W⁺/W⁻ as half-sums), adjoints (the same, with flipped adjoint kernels) and
    precomputed (W⁺/W⁻ folded) agree to float32 rounding."""
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = {mode: Explainer(dconnx.convert(FIXTURE, methods=ALL3, weight_variants=mode).model,
                           providers=["CPUExecutionProvider"])(x, target=[0, 3])
           for mode in ("session", "adjoints", "precomputed")}
    for k, v in out["precomputed"].items():
        for mode in ("session", "adjoints"):
            np.testing.assert_allclose(out[mode][k], v, rtol=0, atol=1e-5 * np.abs(v).max(), err_msg=(mode, k))


def test_unknown_layout_is_refused():
    with pytest.raises(dconnx.DconnxError, match="weight_variants"):
        dconnx.convert(FIXTURE, weight_variants="lazy")
