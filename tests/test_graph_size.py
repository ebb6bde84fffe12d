"""The generated graph's size, counted per original op, so that a regression that adds
products (the runtime's cost) fails CI. Not a timing."""
from collections import Counter

import pytest

import dconnx

# Products per original Conv, by what the requested methods need (weight_variants="session",
# the default: the session holds W and |W| only):
# the forward Conv itself; SplitGrad/SplitCAM: |W|ᵀ on σ and Wᵀ on ∇ (2);
# SplitLRP: |W| on the input streams for the ε denominators (1) and its transposed products,
# W⁺ᵀs = ½(|W|ᵀs + Wᵀs) (2): under recentering a Relu output has no n-stream and its relevance
# no N part, so the input layer, whose image has both streams, takes W⁻ᵀs = ½(|W|ᵀs − Wᵀs)
# from the same two products.
PER_CONV = {"": 1, "splitgrad": 3, "splitcam": 3, "splitgrad,splitcam": 3, "splitlrp": 4,
            "splitgrad,splitcam,splitlrp": 6}
INPUT_LAYER_EXTRA = {}
# weight_variants="precomputed" (W⁺ and W⁻ folded at session start): SplitLRP needs one transposed
# product, W⁺ᵀ, and the input layer a second one, W⁻ᵀ
PER_CONV_PRECOMPUTED = {**PER_CONV, "splitlrp": 3, "splitgrad,splitcam,splitlrp": 5}
INPUT_LAYER_EXTRA_PRECOMPUTED = {"splitlrp": 1, "splitgrad,splitcam,splitlrp": 1}


def _stream_relus(model):
    """Relu nodes that build streams (relu(x), relu(−x), clamps) rather than the network's own."""
    return sum(1 for n in model.graph.node if n.op_type == "Relu" and n.name.startswith("dc/"))


def _products(model):
    c = Counter(n.op_type for n in model.graph.node)
    return c["Conv"] + c["ConvTranspose"], c


CASES = [(a, e, m) for a, e in (("resnet18", "torchscript"), ("resnet18", "dynamo")) for m in PER_CONV]
# VGG16's 13 convs and feature indices at 32x32 (tests/zoo.py VGG16Small): counts do not depend
# on the input size or the classifier's width
CASES += [("vgg16_small", "torchscript", m) for m in ("splitgrad", "splitgrad,splitcam,splitlrp")]


@pytest.fixture(scope="module")
def convs():
    """(arch, exporter, source) -> the Conv count of its canonical forward with g and h
    (methods=(): one Conv per Conv), converted once per model for every method set."""
    cache = {}

    def get(arch, exporter, path):
        if (arch, exporter) not in cache:
            cache[(arch, exporter)], _ = _products(dconnx.convert(path, methods=()).model)
        return cache[(arch, exporter)]
    return get


@pytest.mark.parametrize("arch,exporter,methods", CASES)
def test_products_per_conv(arch, exporter, methods, zoo_model, convs, request):
    path = (request.getfixturevalue("vgg16_small_onnx") if arch == "vgg16_small"
            else zoo_model(arch, exporter))
    n_conv = convs(arch, exporter, path)
    converted = dconnx.convert(path, methods=methods).model
    n, counts = _products(converted)
    assert n == PER_CONV[methods] * n_conv + INPUT_LAYER_EXTRA.get(methods, 0), (n, n_conv, counts)
    if "splitlrp" in methods:
        n_pre, _ = _products(dconnx.convert(path, methods=methods, weight_variants="precomputed").model)
        assert n_pre == PER_CONV_PRECOMPUTED[methods] * n_conv + INPUT_LAYER_EXTRA_PRECOMPUTED[methods]
    if methods:
        # one mask per Relu, shared by every method; SplitLRP alone needs none (recentered Relus
        # pass its relevance unchanged)
        relus = counts["Relu"] - _stream_relus(converted)
        assert counts["Greater"] == (0 if methods == "splitlrp" else relus), counts


def test_products_shrink_with_a_deeper_layer(vgg16_small_onnx):
    """Maps at layer 26 of VGG16 (its features at 32x32) need no transposed products below it."""
    path = vgg16_small_onnx
    full, _ = _products(dconnx.convert(path, methods="splitgrad").model)
    deep, _ = _products(dconnx.convert(path, methods="splitgrad", layer=26).model)
    n_conv = 13
    convs_above = 2   # features[26] and features[28] lie between layer 26 and the output
    assert full == 3 * n_conv
    assert deep == n_conv + 2 * convs_above
