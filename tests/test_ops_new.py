"""Resize / Upsample and ConvTranspose beyond the op table (tests/op_cases.py):

* the interpolation matrices, computed in numpy from the ONNX definition, against
  onnxruntime's own Resize on every basis vector (every nearest_mode and coordinate mode);
* converted single-node Resize graphs: g − h is onnxruntime's Resize output and the four
  sensitivities reconstruct the exact Jacobian row (taken from onnxruntime too);
* in float64 against torch: at α = 0 the pair sum δpp + δnn is σ + ½∇f with σ the
  gradient of the network with |W| and every ReLU passed through (the linear rule on
  the sums), at α = 0.5 SplitGrad is ½ the autograd gradient summed over channels.
"""
import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import dconnx
from dconnx.ops.resample import resize_matrix
from helpers import export, rel_err, run, session

COORDS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
MODES = [("nearest", c, n) for c in COORDS for n in NEAREST] + [("linear", c, "round_prefer_floor")
                                                                 for c in COORDS]
# (input H, W) and either scales or sizes for H, W: non-integer scales put output pixels
# exactly halfway between input pixels, where the nearest modes differ
GEOMETRIES = [((4, 6), ("scales", [1.5, 2.5])), ((7, 5), ("sizes", [3, 9]))]


def _resize_model(mode, coord, nearest, geo, channels=2, flatten=True):
    (h, w), (kind, vals) = geo
    inits = [helper.make_tensor("roi", TensorProto.FLOAT, [0], [])]
    if kind == "scales":
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0] + vals))
        ins = ["input", "roi", "scales"]
        out_hw = [int(np.floor(h * vals[0])), int(np.floor(w * vals[1]))]
    else:
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [4], [1, channels] + vals))
        ins = ["input", "roi", "", "sizes"]
        out_hw = list(vals)
    nodes = [helper.make_node("Resize", ins, ["r"], name="resize", mode=mode,
                              coordinate_transformation_mode=coord, nearest_mode=nearest)]
    k = channels * out_hw[0] * out_hw[1]
    if kind == "sizes":     # a batch of 1 in sizes: run with one sample, flatten to it
        pass
    inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], [-1, k]))
    nodes.append(helper.make_node("Reshape", ["r", "shape"], ["logits"], name="flatten"))
    batch = 1 if kind == "sizes" else "batch"
    g = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [batch, channels, h, w])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, k])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m, (h, w), out_hw, k


def _ort_jacobian(model, shape):
    """Rows of the (linear) model's Jacobian, from onnxruntime on every basis vector."""
    n = int(np.prod(shape))
    sess = session(model)
    rows = [sess.run(None, {"input": np.eye(n, dtype=np.float32)[j].reshape((1,) + shape)})[0][0]
            for j in range(n)]
    return np.stack(rows, 1)        # [outputs, inputs]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=["scales", "sizes"])
@pytest.mark.parametrize("mode,coord,nearest", MODES, ids=["-".join(m) for m in MODES])
def test_resize_matrices_match_onnxruntime(mode, coord, nearest, geo):
    model, (h, w), (oh, ow), _ = _resize_model(mode, coord, nearest, geo, channels=1)
    (kind, vals) = geo[1]
    sh, sw = (vals if kind == "scales" else [oh / h, ow / w])
    A = np.kron(resize_matrix(oh, h, sh, mode, coord, nearest), resize_matrix(ow, w, sw, mode, coord, nearest))
    J = _ort_jacobian(model, (1, h, w))
    assert np.abs(A - J).max() < 1e-6


@pytest.mark.parametrize("geo", GEOMETRIES, ids=["scales", "sizes"])
@pytest.mark.parametrize("mode,coord,nearest", MODES[::3] + MODES[-4:],
                         ids=["-".join(m) for m in MODES[::3] + MODES[-4:]])
def test_resize_converted_exact(mode, coord, nearest, geo):
    model, (h, w), _, k = _resize_model(mode, coord, nearest, geo)
    shape = (2, h, w)
    J = _ort_jacobian(model, shape)
    x = np.random.default_rng(0).standard_normal((1,) + shape).astype(np.float32)
    conv = dconnx.convert(model, methods="splitgrad", share_forward=False, expose=["input"]).model
    for target, alpha in ((0, 0.0), (k // 2, 0.35), (k - 1, 0.5)):
        out = run(conv, x, target=np.array([target]), alpha=alpha)
        f = J @ x.reshape(-1)
        assert np.abs(out["g"] - out["h"] - f).max() < 1e-5
        assert out["input::p"].min() >= 0 and out["input::n"].min() >= 0
        recon = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
        assert np.abs(recon.reshape(-1) - J[target]).max() < 1e-6
        # a nonnegative map, no shift point: δpp + δnn = σ + ½∇f = Jᵀ e_k at every α
        assert np.abs((out["input::dpp"] + out["input::dnn"]).reshape(-1) - J[target]).max() < 1e-6


# -- float64 against torch: σ at α = 0, SplitGrad at α = 0.5 --------------------
class Flat(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.flatten(self.body(x), 1)


def _abs_net(module):
    """The network of the sums: every weight |W|, biases 0, every ReLU the identity."""
    m = copy.deepcopy(module)
    for name, mod in list(m.body.named_children()):
        if isinstance(mod, nn.ReLU):
            setattr(m.body, name, nn.Identity())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                mod.weight.abs_()
                if mod.bias is not None:
                    mod.bias.zero_()
    return m


F64_CASES = {
    "conv_relu_upsample_bilinear": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Conv2d(4, 2, 3, padding=1), nn.ReLU()),
    "conv_relu_upsample_nearest_align": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Upsample(size=(7, 9), mode="bilinear", align_corners=True),
        nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest")),
    "convT_relu_convT": lambda: nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), nn.ReLU()),
}


@pytest.mark.parametrize("name", list(F64_CASES))
def test_sigma_and_half_gradient_float64(name):
    torch.manual_seed(0)
    module = Flat(F64_CASES[name]()).double().eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    model = export(module, torch.tensor(x))
    conv = dconnx.convert(model, methods="splitgrad", expose=["input"]).model
    t = module(torch.tensor(x)).argmax(1).numpy()     # a live output (not cut by the last ReLU)

    xt = torch.tensor(x, requires_grad=True)
    module(xt).gather(1, torch.tensor(t)[:, None]).sum().backward()
    grad = xt.grad.numpy()
    xa = torch.tensor(x, requires_grad=True)
    _abs_net(module)(xa).gather(1, torch.tensor(t)[:, None]).sum().backward()
    sigma = 0.5 * xa.grad.numpy()
    assert np.abs(sigma).max() > 0 and np.abs(grad).max() > 0

    out0 = run(conv, x, target=t, alpha=0.0)
    assert rel_err(out0["g"] - out0["h"], module(torch.tensor(x)).detach().numpy()) < 1e-10
    assert rel_err(out0["input::dpp"] + out0["input::dnn"], sigma + 0.5 * grad) < 1e-10
    out5 = run(conv, x, target=t, alpha=0.5)
    assert rel_err(out5["splitgrad"], 0.5 * grad.sum(1)) < 1e-10


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_opset9_keeps_its_coordinates(mode):
    """Upsample (opset 9) samples at x_out / scale; the opset upgrade to Resize keeps that."""
    module = Flat(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Upsample(scale_factor=3, mode=mode))).eval()
    x = np.random.default_rng(3).standard_normal((2, 2, 3, 4)).astype(np.float32)
    model = export(module, torch.tensor(x), opset=9)
    assert "Upsample" in {n.op_type for n in model.graph.node}
    f = session(model).run(None, {"input": x})[0]
    out = run(dconnx.convert(model, methods="splitgrad", share_forward=False).model, x)
    assert np.abs(out["logits"] - f).max() < 1e-5
    assert np.abs(out["g"] - out["h"] - f).max() < 1e-5


# -- n-ary Sum / Mean / Max / Min (torch exports none of them n-ary): float64 vs torch ---------
NARY = {"Sum": lambda ts: sum(ts), "Mean": lambda ts: sum(ts) / len(ts),
        "Max": lambda ts: torch.stack(ts).amax(0), "Min": lambda ts: torch.stack(ts).amin(0)}


def _float64_model(name, nodes, in_shape, k, weights):
    """The float64 graph of `nodes` on 'input' [batch, *in_shape], the last node's output reshaped
    to the logits [batch, k], with the constants `weights`; converted for SplitGrad."""
    D = TensorProto.DOUBLE
    g = helper.make_graph(nodes + [helper.make_node("Reshape", [nodes[-1].output[0], "shape"], ["logits"])],
                          name, [helper.make_tensor_value_info("input", D, ["batch", *in_shape])],
                          [helper.make_tensor_value_info("logits", D, ["batch", k])],
                          initializer=[helper.make_tensor(n, D, w.shape, w.ravel()) for n, w in weights.items()]
                          + [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, k])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return dconnx.convert(model, methods="splitgrad", share_forward=False, expose=["input"]).model


def _check_float64(conv, f, x, target=None):
    """g − h and the reconstructed input gradient against torch float64 autograd of `f`, at α = 0
    and 0.5; the target defaults to each sample's largest logit (a positive one: its gradient is
    nonzero through an open Relu)."""
    xt = torch.tensor(x, requires_grad=True)
    fx = f(xt)
    t = fx.argmax(1).numpy() if target is None else target
    fx.gather(1, torch.tensor(t)[:, None]).sum().backward()
    assert np.abs(xt.grad.numpy()).max() > 0
    for alpha in (0.0, 0.5):
        out = run(conv, x, target=t, alpha=alpha)
        assert rel_err(out["g"] - out["h"], fx.detach().numpy()) < 1e-12
        recon = out["input::dpp"] - out["input::dnp"] - out["input::dpn"] + out["input::dnn"]
        assert rel_err(recon, xt.grad.numpy()) < 1e-12


@pytest.mark.parametrize("op", list(NARY))
def test_nary_ops_float64(op):
    """op(relu(x), −x, w·x) with a constant w of both signs: g − h and the reconstructed
    gradient against torch float64 autograd, at α = 0 and α = 0.5."""
    shape = (2, 3, 4, 4)
    rng = np.random.default_rng(4)
    w = rng.standard_normal(shape[1:])
    k = int(np.prod(shape[1:]))
    nodes = [helper.make_node("Relu", ["input"], ["a"]), helper.make_node("Neg", ["input"], ["b"]),
             helper.make_node("Mul", ["input", "w"], ["c"]), helper.make_node(op, ["a", "b", "c"], ["s"])]
    conv = _float64_model("nary", nodes, shape[1:], k, {"w": w})

    def f(xt):
        return NARY[op]([torch.relu(xt), -xt, xt * torch.tensor(w)]).reshape(xt.shape[0], -1)

    _check_float64(conv, f, rng.standard_normal(shape), target=np.array([3, k - 5]))


def _space_to_depth(x, bs):
    """ONNX SpaceToDepth (written from the operator's definition)."""
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n, c * bs * bs, h // bs, w // bs)


def test_space_to_depth_float64():
    """Relu → SpaceToDepth → ·w (both signs): g − h and the reconstructed gradient against torch
    float64 autograd of the operator's definition, at α = 0 and 0.5 (torch exports no
    SpaceToDepth: the graph is built here)."""
    shape, bs = (2, 3, 4, 6), 2
    rng = np.random.default_rng(6)
    out_shape = (shape[1] * bs * bs, shape[2] // bs, shape[3] // bs)
    w = rng.standard_normal(out_shape)
    k = int(np.prod(out_shape))
    nodes = [helper.make_node("Relu", ["input"], ["a"]),
             helper.make_node("SpaceToDepth", ["a"], ["s"], blocksize=bs),
             helper.make_node("Mul", ["s", "w"], ["c"])]
    conv = _float64_model("s2d", nodes, shape[1:], k, {"w": w})
    _check_float64(conv, lambda xt: (_space_to_depth(torch.relu(xt), bs) * torch.tensor(w)).reshape(shape[0], -1),
                   rng.standard_normal(shape))
