"""Op table tests: every supported op, random data of both signs with zeros and ties.

For each case: (1) g − h equals the op's output, in float32 (onnxruntime) and float64
(onnx.reference), for both stabilizations and both MaxPool modes, with the split streams
computed independently of the original activations; (2) streams and g, h are never
negative; (3) checker and strict shape inference pass (the converter runs both);
(4) the sensitivities reconstruct torch autograd's gradient for several α and modes;
(5) the two-product and four-product forms agree.
"""
import numpy as np
import pytest
import torch

import dconnx
from helpers import export, rel_err, run, torch_grad, with_ties
from op_cases import CASES

CASE_IDS = [c.name for c in CASES]


def _data(case, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return with_ties(rng.standard_normal(case.shape).astype(dtype), seed)


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(case, dtype):
        key = (case.name, dtype)
        if key not in cache:
            m = case.module()
            if dtype == np.float64:
                m = m.double()
            x = torch.tensor(_data(case, dtype))
            cache[key] = (m, export(m, x, keep_bn=case.keep_bn, exporter=case.extra.get("exporter", "torchscript")))
        return cache[key]
    return get


def _output_recentered(conv) -> bool:
    """Whether the op that makes the logits (under the final reshape) is a recentering point."""
    from dconnx.ops import SUPPORTED
    producer = {o: n for n in conv.graph.node for o in n.output}
    node = producer["logits"]
    while node.op_type == "Reshape":
        if node.input[0] not in producer:
            return False      # reshape of the input itself: recentered at the input only
        node = producer[node.input[0]]
    info = SUPPORTED[node.op_type]
    if info.recenter == "two-data":
        return all(i in producer or i == "input" for i in node.input)
    return bool(info.recenter)


def _modes(case):
    return ["wta", "dc"] if case.pool else ["wta"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("stabilize", ["recenter", "none"])
def test_forward_split_reconstructs_output_float32(case, stabilize, exported):
    module, model = exported(case, np.float32)
    x = _data(case)
    f = module(torch.tensor(x)).detach().numpy()
    for maxpool in _modes(case):
        conv = dconnx.convert(model, methods=(), stabilize=stabilize, maxpool=maxpool, share_forward=False,
                              expose=["input"]).model
        out = run(conv, x)
        scale = np.max(np.abs(f)) + 1.0
        assert np.max(np.abs(out["g"] - out["h"] - f)) <= 2e-5 * scale * (1 + np.max(out["g"]) / scale)
        assert np.allclose(out["logits"], f, rtol=1e-5, atol=1e-5)
        for key in ("g", "h", "input::p", "input::n"):
            assert out[key].min() >= 0.0, key
        if stabilize == "recenter" and _output_recentered(conv):
            assert np.allclose(out["g"], np.maximum(out["logits"], 0), atol=1e-6)
            assert np.allclose(out["h"], np.maximum(-out["logits"], 0), atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_split_float64_both_forms(case, exported):
    module, model = exported(case, np.float64)
    x = _data(case, np.float64)
    f = module(torch.tensor(x)).detach().numpy()
    for maxpool in _modes(case):
        gh = {}
        for form in ("sumdiff", "four"):
            conv = dconnx.convert(model, methods=(), stabilize="none", maxpool=maxpool, share_forward=False,
                                  linear_form=form).model
            out = run(conv, x)
            # 1e-8, not 1e-12: ONNX float attributes (LeakyRelu's slope) are float32; more where
            # the model's own float64 forward is further from torch's (SELU's float32 constants)
            assert rel_err(out["g"] - out["h"], f) < 1e-8 + 10 * rel_err(out["logits"], f)
            assert out["g"].min() >= 0 and out["h"].min() >= 0
            gh[form] = (out["g"], out["h"])
        assert rel_err(gh["sumdiff"][0], gh["four"][0]) < 1e-10
        assert rel_err(gh["sumdiff"][1], gh["four"][1]) < 1e-10


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["standard", "sum"])
def test_sensitivities_reconstruct_autograd_gradient(case, mode, exported):
    module, model = exported(case, np.float32)
    x = np.random.default_rng(1).standard_normal(case.shape).astype(np.float32)
    # "sum" reconstructs the gradient only with winner-takes-all pooling (docs/method.md)
    for maxpool in (_modes(case) if mode == "standard" else ["wta"]):
        conv = dconnx.convert(model, methods="splitgrad", relu_backward=mode, maxpool=maxpool,
                              expose=["input"]).model
        n_out = module(torch.tensor(x)).shape[1]
        for alpha, target in ((0.0, 0), (0.35, n_out // 2), (0.5, n_out - 1)):
            t = np.full(x.shape[0], target, dtype=np.int64)
            out = run(conv, x, target=t, alpha=alpha)
            recon = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
            grad = torch_grad(module, x, t)
            assert rel_err(recon, grad) < 1e-4, (alpha, target, maxpool)
            if grad.ndim == 4:
                assert rel_err(out["splitgrad"], (out["input::dpp"] + out["input::dnn"]).sum(1)) < 1e-5


def test_mask_diff_mode_does_not_reconstruct_gradient():
    """mask_diff changes the pair sums with the mask; after two Relus the gradient identity fails."""
    from op_cases import Head
    torch.manual_seed(0)
    module = Head(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                                      torch.nn.Flatten(), torch.nn.Linear(256, 5))).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = export(module, torch.tensor(x))
    recon = {}
    for mode in ("standard", "mask_diff"):
        out = run(dconnx.convert(model, methods="splitgrad", relu_backward=mode, expose=["input"]).model, x,
                  alpha=0.0)
        recon[mode] = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
    grad = torch_grad(module, x, out["logits"].argmax(1))
    assert rel_err(recon["standard"], grad) < 1e-4
    assert rel_err(recon["mask_diff"], grad) > 1e-2


def test_ties_mask_option_changes_relu_at_zero():
    """ties='geq' lets gradient through Relu at exactly 0; 'strict' (default) matches relu'(0) = 0."""
    from op_cases import BY_NAME
    case = BY_NAME["relu"]
    module = case.module()
    x = np.zeros(case.shape, dtype=np.float32)
    x[:, :, :4] = 1.0
    model = export(module, torch.tensor(x))
    t = np.full(2, 3 * 8 * 8 - 1, dtype=np.int64)        # a position where x == 0
    strict = run(dconnx.convert(model, methods="splitgrad", expose=["input"]).model, x, target=t, alpha=0.0)
    geq = run(dconnx.convert(model, methods="splitgrad", ties="geq", expose=["input"]).model, x, target=t,
              alpha=0.0)
    grad = torch_grad(module, x, t)
    recon = lambda o: o["input::dpp"] - o["input::dnp"] - o["input::dpn"] + o["input::dnn"]  # noqa: E731
    assert np.allclose(recon(strict), grad) and np.all(grad == 0)
    assert np.abs(recon(geq)).max() > 0
