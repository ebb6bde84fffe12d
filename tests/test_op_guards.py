"""Models that once converted into silently wrong maps: each is now either exact or refused
in preflight with the node's name, and the places where α has no effect are reported."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import dconnx
import onnx_torch
from helpers import export, rel_err, run, session, torch_grad
from reference import dc_reference as ref


class AvgNet(torch.nn.Module):
    def __init__(self, ceil_mode, count_include_pad, size):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.pool = torch.nn.AvgPool2d(3, 2, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        out = -(-(size - 3) // 2) + 1 if ceil_mode else (size - 3) // 2 + 1
        self.fc = torch.nn.Linear(3 * out * out, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("pads_attribute", [True, False])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avgpool_ceil_mode_partial_windows_are_exact(count_include_pad, pads_attribute):
    """ceil_mode=1 adds partial windows at the end (8 → 4, not 3), each divided by its own count
    (a constant per window): g − h is the model's output and the gradient torch's — with explicit
    zero pads and without a `pads` attribute at all (whose default is zero pads too)."""
    net = AvgNet(True, count_include_pad, 8).eval()
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32)
    model = export(net, torch.tensor(x))
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    assert not any(a.name == "pads" and any(a.ints) for a in pool.attribute)
    if not pads_attribute:
        for a in [a for a in pool.attribute if a.name == "pads"]:
            pool.attribute.remove(a)
    conv = dconnx.convert(model, methods="gradient,splitgrad", share_forward=False)
    target = np.array([1, 3])
    out = run(conv, x, target=target, alpha=0.5)
    f = net(torch.tensor(x)).detach().numpy()
    assert rel_err(out["g"] - out["h"], f) < 1e-5
    grad = torch_grad(net, x, target)
    assert rel_err(out["gradient"], grad.sum(1)) < 1e-5
    assert rel_err(out["splitgrad"], 0.5 * grad.sum(1)) < 1e-5


def test_avgpool_ceil_mode_without_partial_windows_is_exact():
    """With 7 inputs, k=3, s=2 the ceil and floor outputs agree (3): accepted, and the gradient
    the converted graph computes matches torch autograd."""
    net = AvgNet(True, False, 7).eval()
    x = np.random.default_rng(0).standard_normal((2, 2, 7, 7)).astype(np.float32)
    model = export(net, torch.tensor(x))
    conv = dconnx.convert(model, methods="gradient,splitgrad")
    target = np.array([1, 3])
    out = run(conv, x, target=target, alpha=0.5)
    grad = torch_grad(net, x, target)
    assert rel_err(out["gradient"], grad.sum(1)) < 1e-5
    assert rel_err(out["splitgrad"], 0.5 * grad.sum(1)) < 1e-5   # α = 0.5: half the gradient


def _maxpool_model(storage_order: int, indices_output: bool = False):
    """Conv → Relu → MaxPool(2, 2) with the given storage_order → Flatten → Gemm, and its torch twin."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2, 2), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 3 * 4, 5)).eval()
    model = export(net, torch.zeros(1, 2, 6, 8))
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    pool.attribute.append(helper.make_attribute("storage_order", storage_order))
    if indices_output:
        pool.output.append("pool_indices")
        model.graph.output.append(helper.make_tensor_value_info("pool_indices", TensorProto.INT64,
                                                                   ["N", 3, 3, 4]))
    return net, model


def test_maxpool_storage_order_column_major_is_exact():
    """storage_order only changes the layout of the Indices output, which the original graph does
    not use: the maps must be those of the row-major pool (the routing is ours)."""
    net, model = _maxpool_model(1)
    x = np.random.default_rng(2).standard_normal((2, 2, 6, 8)).astype(np.float32)
    conv = dconnx.convert(model, methods="gradient")
    target = np.array([0, 4])
    out = run(conv, x, target=target)
    assert rel_err(out["gradient"], torch_grad(net, x, target).sum(1)) < 1e-5


def test_maxpool_storage_order_with_consumed_indices_is_refused():
    _, model = _maxpool_model(1, indices_output=True)
    with pytest.raises(dconnx.UnsupportedOpError, match="storage_order"):
        dconnx.convert(model, methods="splitgrad")


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_frobenius_alpha_on_unfolded_batchnorm_uses_its_epsilon(eps):
    """Per-layer α of a BatchNorm kept as its own op comes from its scale γ/√(var + ε) with the
    node's own ε; compared with the float64 reference (which reads BatchNorm2d.eps)."""
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm2d(4, eps=eps)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.01, 0.3)   # small variances: ε matters
        bn.weight.uniform_(0.5, 1.5)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), bn, torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3)).double().eval()
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 5))
    model = export(net, torch.tensor(x), keep_bn=True)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    conv, _ = dconnx.compile_model(model, methods="splitgrad", alpha_mode="frobenius",
                                   fold_batchnorm=False, expose=["input"])
    out = onnx_torch.run(conv, {"input": x, "alpha": np.array(0.35)})
    res = ref.run(net, torch.tensor(x), alpha=0.35, alpha_mode="frobenius", fold_bn=False, layers=["input"])
    # ONNX stores ε as a float32 attribute (0.1 differs from torch's by 1.5e-9 relative);
    # reading ε = 1e-5 instead of the node's is a 2e-2 error at ε = 0.1
    for i, name in enumerate(("dpp", "dnp", "dpn", "dnn")):
        assert rel_err(out[f"input::{name}"], res.sens["input"][i].numpy()) < 1e-7, name
    assert rel_err(out["splitgrad"], ref.splitgrad(res, "input").numpy()) < 1e-7


class CamNet(torch.nn.Module):
    """conv blocks, then GAP + fc: the usual CAM layer is the last block's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_layer_past_the_last_shift_point_is_reported():
    """At the last Relu's output only GAP and the output Gemm lie above: no α-shift is crossed,
    so the maps there are the same for every α — and `convert` says so, naming the layer."""
    net = CamNet().eval()
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = export(net, torch.tensor(x))
    last_relu = [n for n in model.graph.node if n.op_type == "Relu"][-1].output[0]
    conv, report = dconnx.compile_model(model, methods="splitcam,splitgrad", layer=last_relu)
    notes = [n for n in report.notes if "alpha" in n and last_relu in n]
    assert notes, report.notes
    maps = [run(conv, x, alpha=a) for a in (0.0, 0.25, 0.5)]
    for m in ("splitcam", "splitgrad"):
        assert all(np.array_equal(maps[0][m], o[m]) for o in maps[1:]), m
    # one layer lower α acts (SplitCAM changes), and no note is given
    first_relu = [n for n in model.graph.node if n.op_type == "Relu"][0].output[0]
    conv, report = dconnx.compile_model(model, methods="splitcam", layer=first_relu)
    assert not [n for n in report.notes if "alpha" in n and first_relu in n]
    lo, hi = (run(conv, x, alpha=a)["splitcam"] for a in (0.0, 0.5))
    assert rel_err(lo, hi) > 1e-3


def _const_op_model(op, const, data_shape=(3, 4, 4), pads=None):
    """input → Conv(3→3, 1×1) → <op>(data, const) → ReduceMean over space → Flatten → logits."""
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    inits = [w, numpy_helper.from_array(np.asarray(const, np.float32), "c")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["t0"], name="conv")]
    if op == "Pad":
        inits[1] = numpy_helper.from_array(np.asarray(pads, np.int64), "c")
        nodes.append(helper.make_node("Pad", ["t0", "c"], ["t1"], name="the_pad"))
    else:
        nodes.append(helper.make_node(op, ["t0", "c"], ["t1"], name="the_op"))
    nodes += [helper.make_node("GlobalAveragePool", ["t1"], ["t2"], name="gap"),
              helper.make_node("Flatten", ["t2"], ["logits"], name="flatten")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                    ["N", *data_shape])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_constant_that_broadcasts_the_data_up_is_refused(op):
    """[N, 3, 1, 4] ⊙ [1, 3, 4, 4] makes the data tensor bigger: refused before any rewriting,
    with the node's name (it used to fail inside onnx.checker at a generated node)."""
    model = _const_op_model(op, np.full((1, 3, 4, 4), 1.5), data_shape=(3, 1, 4))
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(dconnx.UnsupportedOpError, match="broadcast") as err:
        dconnx.convert(model, methods="splitgrad")
    assert [name for name, _, _ in err.value.nodes] == ["the_op"]


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_constant_that_broadcasts_down_is_accepted(op):
    model = _const_op_model(op, np.linspace(0.5, 2.0, 3).reshape(3, 1, 1))
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 4)).astype(np.float32)
    conv = dconnx.convert(model, methods="gradient")
    out = run(conv, x, target=np.array([0, 2]))
    assert out["gradient"].shape == (2, 4, 4)


def test_negative_pad_is_refused():
    model = _const_op_model("Pad", None, pads=[0, 0, 0, -1, 0, 0, 0, 0])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(dconnx.UnsupportedOpError, match="negative") as err:
        dconnx.convert(model, methods="splitgrad")
    assert [name for name, _, _ in err.value.nodes] == ["the_pad"]


def test_layers_lists_the_alpha_shifts_above_each_layer(tmp_path, capsys):
    """`dconnx layers` prints K, the α-shift points above each layer. Checked against the maps
    themselves: in a chain SplitGrad = Σ_c (σ + ½∇f) with σ scaled by (1 − 2α) at each shift, so
    SplitGrad(α) − SplitGrad(½) = (1 − 2α)^K · (SplitGrad(0) − SplitGrad(½))."""
    from pathlib import Path
    from dconnx.cli import main
    model = str(Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx")
    assert main(["layers", model]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    ks = {int(r[0]): int(r[3]) for r in rows if len(r) > 4 and r[0].isdigit() and r[3].isdigit()}
    x = np.random.default_rng(8).standard_normal((2, 3, 64, 64)).astype(np.float32)
    checked = 0
    for index in (8, 11, 12, 13):
        conv, _ = dconnx.compile_model(model, methods="splitgrad", layer=index, upsample=False)
        sg = {a: run(conv, x, alpha=a, target=np.array([1, 2]))["splitgrad"] for a in (0.0, 0.25, 0.5)}
        expected = (1 - 2 * 0.25) ** ks[index] * (sg[0.0] - sg[0.5])
        assert rel_err(sg[0.25] - sg[0.5], expected) < 1e-4, (index, ks[index])
        checked += 1
    assert checked == 4 and ks[13] == 0 and ks[12] == 1 and ks[0] > ks[8]


def _indices_feed_model():
    """Conv → Relu → MaxPool whose Indices output is cast to float and added to its values →
    Flatten → Gemm: the graph computes on argmax positions."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 36)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p", "p_idx"], name="the_pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Cast", ["p_idx"], ["p_idx_f"], name="cast_idx", to=TensorProto.FLOAT),
             helper.make_node("Add", ["p", "p_idx_f"], ["q"], name="add_idx"),
             helper.make_node("Flatten", ["q"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_maxpool_indices_feeding_the_graph_is_refused():
    """Once `RuntimeError: no streams for tensor ... (split pass missing?)` with a traceback."""
    with pytest.raises(dconnx.UnsupportedOpError, match="Indices") as err:
        dconnx.convert(_indices_feed_model(), methods="splitgrad")
    pools = [(name, op, why) for name, op, why in err.value.nodes if op == "MaxPool"]
    assert [(name, op) for name, op, _ in pools] == [("the_pool", "MaxPool")]
    assert "p_idx" in pools[0][2] and "cast_idx" in pools[0][2]


def test_maxpool_indices_feeding_the_graph_is_refused_by_the_cli(tmp_path):
    import subprocess
    import sys
    src = tmp_path / "indices.onnx"
    onnx.save(_indices_feed_model(), src)
    proc = subprocess.run([sys.executable, "-m", "dconnx", "convert", str(src), "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "the_pool" in proc.stderr and "MaxPool" in proc.stderr and "Indices" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def _renamed_batch_model():
    """Two Conv → Relu branches, one through a Reshape to [-1, 8, 16, 16], summed by an Add →
    GlobalAveragePool → Flatten → Gemm (9 nodes). Shape inference names the batch axis behind
    the Reshape anew ('unk__0'), so the Add's operands are ['N', 8, 16, 16] and
    ['unk__0', 8, 16, 16]: the same shape."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.asarray([-1, 8, 16, 16], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node("Conv", ["input", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                              strides=[1, 2]),
             helper.make_node("Relu", ["c2"], ["b"], name="relu2"),
             helper.make_node("Reshape", ["b", "shape"], ["b8"], name="reshape"),
             helper.make_node("Add", ["a", "b8"], ["s"], name="residual"),
             helper.make_node("GlobalAveragePool", ["s"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                    ["N", 4, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_same_shape_under_two_batch_names_converts_exactly():
    """Residual ops compare only the dims that are known: a batch axis renamed by shape inference
    is no broadcast (it was refused as 'broadcasting between data tensors')."""
    model = _renamed_batch_model()
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in inferred.graph.value_info}
    assert dims["a"][1:] == dims["b8"][1:] and dims["a"][0] != dims["b8"][0]   # the case at hand
    conv = dconnx.convert(model, methods="splitgrad,gradient")
    x = np.random.default_rng(6).standard_normal((3, 4, 16, 16)).astype(np.float32)
    plain = helper.make_model(model.graph, opset_imports=model.opset_import, ir_version=8)
    logits = session(plain).run(None, {"input": x})[0]
    out = run(conv, x, target=np.array([0, 3, 5]), alpha=0.5)
    f = out["g"] - out["h"]
    assert np.abs(f - logits).max() <= 1e-5 * max(1.0, np.abs(logits).max())
    assert rel_err(out["splitgrad"], 0.5 * out["gradient"]) < 1e-5     # α = 0.5: half the gradient


def test_data_operands_of_different_known_shapes_are_still_refused():
    model = _renamed_batch_model()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.asarray([-1, 8, 16, 1], np.int64), "shape"))
    with pytest.raises(dconnx.UnsupportedOpError, match="broadcasting between data tensors") as err:
        dconnx.convert(model, methods="splitgrad")
    assert [name for name, _, _ in err.value.nodes] == ["residual"]
