"""The converted graph against the independent float64 torch reference (tests/reference),
written from docs/method.md, not from the compiler: streams g and h, the four sensitivities,
SplitLRP relevance and the three heads — on the op table and on VGG16 and ResNet18 with
random weights for α ∈ {0, 0.35, 0.4, 0.5}.

Both sides run in float64 (the converted graph with tests/onnx_torch.py), so the
tolerances are tight. Sensitivities are compared relative to their own largest value:
at α = 0 they grow to ~1e18 in deep nets, and only their difference, the gradient, is small.
"""
import dataclasses

import numpy as np
import pytest
import torch

import dconnx
import onnx_torch
import zoo
from helpers import THREADS, export, rel_err
from op_cases import CASES
from reference import dc_reference as ref

ALPHAS = (0.0, 0.35, 0.4, 0.5)
TIGHT = 1e-9


def _converted(model, layer=None, expose=("input",), **opts):
    return dconnx.convert(model, methods="splitgrad,splitcam,splitlrp", layer=layer, expose=list(expose),
                          **opts).model


def _check(out, res, prefix, key, tol=TIGHT, tol_relevance=None):
    p, n = res.streams[key]
    assert rel_err(out[f"{prefix}::p"], p.numpy()) < tol
    assert rel_err(out[f"{prefix}::n"], n.numpy()) < tol
    for i, name in enumerate(("dpp", "dnp", "dpn", "dnn")):
        assert rel_err(out[f"{prefix}::{name}"], res.sens[key][i].numpy()) < tol, name
    rgp, rgn, rhp, rhn = (r.numpy() for r in res.relevance[key])
    tol_relevance = tol_relevance or tol
    assert rel_err(out[f"{prefix}::Rp"], rgp - rhp) < tol_relevance
    assert rel_err(out[f"{prefix}::Rn"], rgn - rhn) < tol_relevance


def _check_heads(out, res, key, size, tol=TIGHT):
    for name, head in (("splitgrad", ref.splitgrad), ("splitcam", ref.splitcam), ("splitlrp", ref.splitlrp)):
        expected = ref.upsample(head(res, key), size).numpy()
        assert rel_err(out[name], expected) < tol, name


def _modes(case):
    return ["wta", "dc"] if case.pool else ["wta"]


# Celu converts as α·Elu(x/α) (ONNX defines Celu for float32 only), and SplitLRP applies the ε-rule at
# the two constant Muls of that form where the reference passes relevance through the activation
# (a difference of 1e-6 measured; its streams and sensitivities are checked in tests/test_ops.py)
F64_CASES = [c for c in CASES if c.name != "celu"]
# ops whose constants are float32 attributes in ONNX: LeakyRelu's slope (0.1 is 1.5e-9 off the torch
# module's), Selu's α and γ, HardSigmoid's 1/6 — the float64 graph computes with the rounded constants
FLOAT32_ATTRIBUTES = ("leaky_relu", "selu", "hardsigmoid")


@pytest.fixture(scope="module")
def op_models():
    """case -> (float64 module, input, its export, its canonical graph), made once per case: the
    export and the reference's graph do not depend on the options a test converts with."""
    cache = {}

    def get(case):
        if case.name not in cache:
            module = case.module().double()
            x = np.random.default_rng(3).standard_normal(case.shape)
            model = export(module, torch.tensor(x), exporter=case.extra.get("exporter", "torchscript"))
            cache[case.name] = (module, x, model, ref.canonicalize(module, torch.tensor(x)))
        return cache[case.name]
    return get


@pytest.mark.parametrize("case", F64_CASES, ids=[c.name for c in F64_CASES])
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_op_table_matches_reference(case, stabilize, op_models):
    tol = 1e-7 if case.name in FLOAT32_ATTRIBUTES else TIGHT
    # relu(a − b) of two data branches: the ε-rule (ε = 1e-6) divides by stream sums near 0 there,
    # which amplifies float64 rounding of the relevance (measured up to 1.7e-9)
    tol_relevance = 1e-8 if case.name in ("max_two_data", "min_two_data", "reduce_min_h") else tol
    module, x, model, graph = op_models(case)
    for maxpool in _modes(case):
        for mode in ("standard", "sum", "mask_diff"):
            conv = _converted(model, stabilize=stabilize, maxpool=maxpool, relu_backward=mode,
                              share_forward=False)
            out = onnx_torch.run(conv, {"input": x, "alpha": np.array(0.35)})
            res = ref.run(module, torch.tensor(x), alpha=0.35, stabilize=stabilize, maxpool=maxpool,
                          relu_backward=mode, layers=["input"], graph=graph)
            assert rel_err(out["g"], res.g.numpy()) < tol
            assert rel_err(out["h"], res.h.numpy()) < tol
            _check(out, res, "input", "input", tol, tol_relevance)
            if x.ndim == 4:
                _check_heads(out, res, "input", x.shape[2:], tol_relevance)


# float64 at 224x224 peaked at 12.6 GB; at 32 the layers are 16, 8, 8 and 2 pixels (every max pool
# still halves its input: the last one leaves 1 pixel)
VGG_SIZE = 32


@pytest.fixture(scope="module")
def vgg16():
    torch.set_num_threads(THREADS)
    module = zoo.build_vgg16_small(VGG_SIZE).double()
    x = np.random.default_rng(5).standard_normal((1, 3, VGG_SIZE, VGG_SIZE))
    layers = ["input", "5", "12", "14", "26"]
    conv = _converted(export(module, torch.tensor(x)), layer=26, expose=layers)
    graph = ref.canonicalize(module, torch.tensor(x), True)
    return module, x, conv, graph, layers


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ALPHAS)
def test_vgg16_matches_reference(vgg16, alpha):
    module, x, conv, graph, layers = vgg16
    out = onnx_torch.run(conv, {"input": x, "alpha": np.array(alpha)})
    keys = ["input", 5, 12, 14, 26]
    # SplitLRP does not depend on α: the reference computes it once, at α = 0.5
    res = ref.run(module, torch.tensor(x), alpha=alpha, layers=keys, graph=graph, lrp=(alpha == 0.5))
    assert rel_err(out["g"], res.g.numpy()) < TIGHT and rel_err(out["h"], res.h.numpy()) < TIGHT
    for prefix, key in zip(layers, keys):
        for i, name in enumerate(("dpp", "dnp", "dpn", "dnn")):
            assert rel_err(out[f"{prefix}::{name}"], res.sens[key][i].numpy()) < TIGHT, (prefix, name)
        assert rel_err(out[f"{prefix}::p"], res.streams[key][0].numpy()) < TIGHT
    size = x.shape[2:]
    expected = ref.upsample(ref.splitgrad(res, 26), size).numpy()
    assert rel_err(out["splitgrad"], expected) < TIGHT
    expected = ref.upsample(ref.splitcam(res, 26), size).numpy()
    assert rel_err(out["splitcam"], expected) < TIGHT
    for name in ("splitgrad", "splitcam"):      # the maps compared are not trivial
        assert np.all(np.isfinite(out[name])) and np.ptp(out[name]) > 1e-6 * np.abs(out[name]).max() > 0
    if alpha == 0.5:
        _check_heads(out, res, 26, size)
        for prefix, key in zip(layers, keys):
            rgp, rgn, rhp, rhn = (r.numpy() for r in res.relevance[key])
            assert rel_err(out[f"{prefix}::Rp"], rgp - rhp) < TIGHT


@pytest.fixture(scope="module")
def resnet18():
    """ResNet18 in float64, its input, target and canonical graph, and per max-pool mode its
    conversion and the reference at α = 0.5 (made once: α is an input of the converted graph, and
    SplitLRP, which the reference computes at α = 0.5 only, does not depend on it)."""
    torch.set_num_threads(THREADS)
    module = zoo.build("resnet18").double()
    x = np.random.default_rng(6).standard_normal((2, 3, 64, 64))
    target = np.array([3, 500])
    model = export(module, torch.tensor(x))
    graph = ref.canonicalize(module, torch.tensor(x))
    modes = {}

    def per_mode(maxpool):
        if maxpool not in modes:
            modes.clear()       # the tests run one max-pool mode after the other
            modes[maxpool] = (_converted(model, maxpool=maxpool),
                              ref.run(module, torch.tensor(x), target=torch.tensor(target), alpha=0.5,
                                      maxpool=maxpool, layers=["input"], graph=graph))
        return modes[maxpool]
    return module, x, target, graph, per_mode


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("maxpool", ["wta", "dc"])
def test_resnet18_matches_reference(alpha, maxpool, resnet18):
    module, x, target, graph, per_mode = resnet18
    conv, half = per_mode(maxpool)
    out = onnx_torch.run(conv, {"input": x, "alpha": np.array(alpha), "target": target})
    res = half
    if alpha != 0.5:
        # SplitLRP does not depend on α: its reference is the α = 0.5 run's
        res = dataclasses.replace(ref.run(module, torch.tensor(x), target=torch.tensor(target), alpha=alpha,
                                          maxpool=maxpool, layers=["input"], graph=graph, lrp=False),
                                  relevance=half.relevance, lrp_sums=half.lrp_sums)
    assert rel_err(out["g"], res.g.numpy()) < TIGHT and rel_err(out["h"], res.h.numpy()) < TIGHT
    _check(out, res, "input", "input")
    _check_heads(out, res, "input", (64, 64))


@pytest.mark.parametrize("stabilize", ["recenter", "none"])
@pytest.mark.parametrize("maxpool", ["wta", "dc"])
def test_splitlrp_conserves_relevance(stabilize, maxpool):
    """Without biases and with a tiny ε, the SplitLRP map at the input sums to g_k − h_k;
    with biases the missing relevance is what the biases absorb (it is not conserved)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 5, bias=False)).double().eval()
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16))
    model = export(net, torch.tensor(x))
    for eps in (1e-12, 1e-2):
        conv = dconnx.convert(model, methods="splitlrp", stabilize=stabilize, maxpool=maxpool, lrp_epsilon=eps).model
        out = onnx_torch.run(conv, {"input": x})
        k = out["logits"].argmax(1)
        gk, hk = out["g"][np.arange(3), k], out["h"][np.arange(3), k]
        total = out["splitlrp"].sum(axis=(1, 2))
        if eps == 1e-12:
            assert rel_err(total, gk - hk) < 1e-8
        else:   # ε absorbs relevance: less arrives at the input, never more
            assert np.all(np.abs(total) < np.abs(gk - hk))
