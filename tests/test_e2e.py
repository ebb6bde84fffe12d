"""End to end on torchvision architectures (random weights, randomized BatchNorm statistics),
exported with both PyTorch exporters.

float32, onnxruntime: the split reconstructs the logits, the batch axis stays dynamic, the
file stays the original's size, the three heads run, `target` and `alpha` are inputs; at
α = 0.5 the float32 SplitGrad and SplitCAM equal the float64 evaluation of the same graph in
onnxruntime's own activation pattern (tests/regions.py; float32 tolerance).
float64 (the same exported graph cast to double, run by the torch interpreter in
tests/onnx_torch.py): SplitGrad at α = 0.5 equals half the channel-summed torch autograd
gradient (through the same exported graph), SplitCAM at α = 0.5 equals half of LayerCAM on
the input streams, for a target other than the argmax — exactly, free of float32 sign flips
of pre-activations near 0; g, h and the three maps equal the independent float64 reference
(tests/reference) on the module.

With share_forward=True (the default) the difference stream is the original activation, so
under recentering g − h = f holds by construction: every exactness check here also runs with
share_forward=False, where the streams alone carry it.
"""
import os

import numpy as np
import onnx
import pytest
import torch

import dconnx
import onnx_torch
import zoo
from dconnx.runtime import make_session
from helpers import THREADS, rel_err, session
from precision import to_float64
from regions import float32_and_same_region_float64, onnx_autograd
from reference import dc_reference as ref

ARCHS = ["resnet18", "squeezenet1_1", "mobilenet_v2", "shufflenet_v2_x0_5", "densenet121", "resnet50",
         "vgg16"]
SLOW = {"vgg16", "resnet50", "densenet121"}
PARAMS = [pytest.param(a, e, marks=[pytest.mark.slow] if a in SLOW else [], id=f"{a}-{e}")
          for a in ARCHS for e in zoo.EXPORTERS]
# float64 convolutions are slow on CPU: VGG16 and ResNet50 are checked in float64 by
# tests/test_reference_match.py (VGG16) and in float32 here
PARAMS64 = [p for p in PARAMS if p.id.split("-")[0] not in ("vgg16", "resnet50")]
METHODS = "splitgrad,splitcam,splitlrp"


def _file_bytes(path) -> int:
    path = str(path)
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def _input(arch, batch, dtype=np.float32):
    c, h, w = zoo.input_size(arch)
    return np.random.default_rng(7).standard_normal((batch, c, h, w)).astype(dtype)


def _float32_in_its_own_region(model, x, target):
    """At α = 0.5, onnxruntime's float32 SplitGrad and SplitCAM equal the float64 evaluation of
    the same graph in onnxruntime's activation pattern (tests/regions.py); that the float64
    values are half the autograd gradient and half of LayerCAM is the float64 test below."""
    feeds = {"input": x, "target": target, "alpha": np.array(0.5, np.float32)}
    out32, ref64 = float32_and_same_region_float64(model, feeds)
    for m in ("splitgrad", "splitcam"):
        assert rel_err(out32[m], ref64[m]) < 1e-4, m


# float32 maps are never compared with float32 torch autograd: deep random nets flip the sign of
# pre-activations near 0 between the two runtimes (VGG16, ResNet50: 1e-2 apart; DenseNet121's
# differed on one CPU only), so the float32 run is checked in its own activation pattern and the
# values in float64 (the float64 test below; VGG16 and ResNet50 in tests/test_reference_match.py)
FLOAT32_AUTOGRAD = {a for a in ARCHS if a not in SLOW}
# SplitLRP's W⁺/W⁻ add two folded copies of VGG16's 553 MB of weights to the session (3.7 GB at
# its start instead of 2.4): its VGG16 values are checked in float64 by test_reference_match.py
HEADS = {"vgg16": ("splitgrad", "splitcam")}


@pytest.mark.parametrize("arch,exporter", PARAMS)
def test_float32_split_heads_and_dynamic_batch(arch, exporter, zoo_model, tmp_path):
    path = zoo_model(arch, exporter)
    heads = HEADS.get(arch, tuple(METHODS.split(",")))
    converted = dconnx.convert(path, tmp_path / "model.dc.onnx", methods=",".join(heads))
    batch = 2 if arch == "vgg16" else 4
    x = _input(arch, batch)
    _, _, h, w = x.shape

    original = session(str(path)).run(None, {"input": x})[0]
    # weights appear once: the written file is about the original's size
    converted = converted.path
    assert _file_bytes(converted) <= 1.05 * _file_bytes(path)
    # the session reads the written file: one copy of VGG16's weights in memory at a time
    sess = session(converted)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["logits", "g", "h", *heads]
    out = dict(zip(names, sess.run(None, {"input": x})))

    # forward split: g − h is the logits of the original model; its own output is unchanged
    assert rel_err(out["g"] - out["h"], original) < 1e-4
    assert rel_err(out["logits"], original) < 1e-5
    assert out["g"].min() >= 0 and out["h"].min() >= 0

    # one finite [batch, H, W] map per method
    for m in heads:
        assert out[m].shape == (batch, h, w) and np.isfinite(out[m]).all()
    assert out["splitcam"].min() >= 0

    # dynamic batch: one sample alone gives its row of the batch
    one = dict(zip(names, sess.run(None, {"input": x[1:2]})))
    for k in ("logits", "g", "h", "splitgrad", "splitcam"):
        assert rel_err(one[k][0], out[k][1]) < 1e-3, k

    # target and alpha are run-time inputs
    target = (original.argmax(1) + 1) % original.shape[1]
    other = dict(zip(names, sess.run(None, {"input": x, "target": target, "alpha": np.array(0.5, np.float32)})))
    for m in heads:
        assert rel_err(other[m], out[m]) > 1e-2, m
    del sess
    if arch in FLOAT32_AUTOGRAD:   # the values at α = 0.5, one sample
        _float32_in_its_own_region(onnx.load(str(converted)), x[1:2], target[1:2])


# VGG16 is a plain chain of ops that the others cover; its unshared split runs in float64 in
# tests/test_reference_match.py's op table and here it would double the suite's peak memory
@pytest.mark.parametrize("arch,exporter", [p for p in PARAMS if p.values[0] != "vgg16"])
def test_float32_split_without_the_shared_forward(arch, exporter, zoo_model):
    """share_forward=False: each difference stream is computed from the streams (W(p − n) + b)
    instead of read from the original activation, so g − h = f is a property, not a construction."""
    path = zoo_model(arch, exporter)
    converted = dconnx.convert(path, methods=METHODS, share_forward=False).model
    x = _input(arch, 2)
    original = session(onnx.load(str(path))).run(None, {"input": x})[0]
    target = (original.argmax(1) + 1) % original.shape[1]
    # without onnxruntime's buffer-reuse planning, which takes seconds to start on graphs of 2000
    # to 3000 nodes (ShuffleNet's here: 5 s, 0.5 s without); the outputs are the same bit for bit,
    # and test_float32_split_heads_and_dynamic_batch runs the sessions with the default options
    sess = make_session(converted, ["CPUExecutionProvider"], memory_reuse=False)
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"input": x, "target": target, "alpha": np.array(0.5, np.float32)})))
    assert rel_err(out["g"] - out["h"], original) < 1e-4
    # recentered streams: g = relu(f), h = relu(−f)
    assert rel_err(out["g"], np.maximum(original, 0)) < 1e-4
    assert rel_err(out["h"], np.maximum(-original, 0)) < 1e-4
    assert np.isfinite(out["splitlrp"]).all()
    if arch in FLOAT32_AUTOGRAD:
        _float32_in_its_own_region(converted, x[1:2], target[1:2])


# share_forward=False once per architecture: what it changes is the compiler's, not the exporter's
# (the cases of one architecture in a row: they share its float64 references)
PARAMS64_SHARED = [q for p in PARAMS64 for q in
                   [pytest.param(*p.values, True, marks=p.marks, id=f"{p.id}-shared")] +
                   ([pytest.param(*p.values, False, marks=p.marks, id=f"{p.id}-unshared")]
                    if p.values[1] == "torchscript" else [])]


@pytest.fixture(scope="module")
def float64_references(zoo_model):
    """(arch, exporter) -> the float64 export, the input, the module's logits, the target, the
    autograd gradient through the export and the independent reference's result on the module:
    made once per module (both exports, shared and unshared conversions) and once per export (the
    gradient); the last architecture's are kept."""
    modules, exports = {}, {}

    def get(arch, exporter):
        if arch not in modules:
            modules.clear()
            x = _input(arch, 1, np.float64)
            net = zoo.build(arch).double()
            with torch.no_grad():
                logits = net(torch.tensor(x))
            # a target other than the default (the argmax) and alpha = 0.5 instead of the default
            # 0.35: SplitGrad = grad/2 and SplitCAM = LayerCAM/2 below hold only if both inputs are
            # honoured (at the default alpha the |W| part of the input layer is scaled by
            # (1 − 2·0.35)^K, K > 0)
            target = (logits.detach().numpy().argmax(1) + 1) % logits.shape[1]
            # the independent float64 reference on the module: streams g, h and the three maps
            # (SplitLRP reads the streams before recentering, P = (S + D)/2 and N = (S − D)/2, at
            # every layer)
            res = ref.run(net, torch.tensor(x), target=torch.as_tensor(target), alpha=0.5)
            modules[arch] = (x, logits.numpy(), target, res)
        x, f, target, res = modules[arch]
        if (arch, exporter) not in exports:
            exports.clear()
            model64 = to_float64(onnx.load(str(zoo_model(arch, exporter))))
            # autograd through the exported graph itself: the exporters fold BatchNorm into the Conv
            # weights in float32 while the module keeps it, 1e-7 apart, enough to move a
            # pre-activation near 0 across its kink and the module's gradient by percents
            # (tests/regions.py)
            exports[(arch, exporter)] = (model64, onnx_autograd(model64, x, target))
        model64, grad = exports[(arch, exporter)]
        return model64, x, f, target, grad, res
    return get


@pytest.mark.parametrize("arch,exporter,share_forward", PARAMS64_SHARED)
def test_float64_heads_equal_autograd_at_alpha_half(arch, exporter, share_forward, float64_references):
    torch.set_num_threads(THREADS)
    model64, x, f, target, grad, res = float64_references(arch, exporter)
    converted = dconnx.convert(model64, methods=METHODS, share_forward=share_forward).model
    half = onnx_torch.run(converted, {"input": x, "target": target, "alpha": np.array(0.5)})
    # 1e-6, not 1e-12, against the module's logits and its reference below: the exporters' folding
    # of BatchNorm (float64_references)
    assert rel_err(half["logits"], f) < 1e-6
    assert rel_err(half["g"] - half["h"], f) < 1e-6
    assert rel_err(half["splitgrad"], 0.5 * grad.sum(1)) < 1e-6
    layercam = np.maximum((np.maximum(grad, 0) * np.abs(x)).sum(1), 0)   # the input streams: p + n = |x|
    assert rel_err(half["splitcam"], 0.5 * layercam) < 1e-6
    # the independent float64 reference on the module
    assert rel_err(half["g"], res.g.numpy()) < 1e-6 and rel_err(half["h"], res.h.numpy()) < 1e-6
    for name, head in (("splitgrad", ref.splitgrad), ("splitcam", ref.splitcam), ("splitlrp", ref.splitlrp)):
        assert rel_err(half[name], head(res, "input").numpy()) < 1e-6, name
