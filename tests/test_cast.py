"""Cast on float data. A Cast between float types is the identity on values (and its gradient
is the identity): a model that mixes float types is explained in its input's float type
throughout (canonicalization retypes it, then removes the Casts). A Cast of data to a non-float
type is refused with the node and the reason."""
import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import dconnx
from dconnx.cli import main
from dconnx.precision import cast_model
from helpers import export, rel_err, run, session, torch_grad


def _model(to: int, back: int = TensorProto.FLOAT) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["cast"], name="the_cast", to=to),
             helper.make_node("Cast", ["cast"], ["back"], name="cast_back", to=back),
             helper.make_node("Relu", ["back"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="gemm", transB=1)]
    g = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          initializer=[w, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _applied(res, prefix):
    return [a for p in res.report.passes for a in p.applied if a.startswith(prefix)]


def test_cast_to_the_same_float_type_is_removed_exactly():
    res = dconnx.convert(_model(TensorProto.FLOAT), methods="splitgrad", alpha=0.5)
    assert any("Cast" in a for a in _applied(res, "remove_identity: "))
    assert not _applied(res, "unify_float_types")
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = run(res.model, x)
    assert np.abs(out["g"] - out["h"] - out["logits"]).max() <= 1e-5 * np.abs(out["logits"]).max()


@pytest.mark.parametrize("to", [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE],
                         ids=["float16", "bfloat16", "float64"])
def test_round_trip_through_another_float_type_is_the_identity(to):
    """Conv → Cast(to) → Cast(float32) → ...: explained in float32, the Casts gone; the converted
    logits are the cast-free model's (the same float32 ops, to the last bit), g − h equals them,
    and the report says what was retyped and that the logits may differ from the original's."""
    res = dconnx.convert(_model(to), methods="splitgrad", alpha=0.5)
    retyped = _applied(res, "unify_float_types")
    assert len(retyped) == 1 and "the_cast" in retyped[0]
    assert any("mixes float types" in n for n in res.report.notes)
    assert not {"the_cast", "cast_back"} & {n.name for n in res.model.graph.node}
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    plain = session(_model(TensorProto.FLOAT)).run(None, {"input": x})[0]
    out = run(res.model, x)
    assert np.array_equal(out["logits"], plain)
    assert np.abs(out["g"] - out["h"] - plain).max() <= 1e-5 * np.abs(plain).max()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.features(x))


def _net(seed=0):
    torch.manual_seed(seed)
    net = _Net().eval()
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net


def _splitgrad_reference(module, x, t):
    """float64 logits and ½ the autograd gradient of the target logits, summed over channels."""
    x64 = x.astype(np.float64)
    with torch.no_grad():
        f = module(torch.tensor(x64)).numpy()
    return f, 0.5 * torch_grad(module, x64, t).sum(1)


def test_float16_body_between_float32_inputs_and_outputs():
    """The layout of a float16 conversion that keeps float32 inputs and outputs (Casts at the
    boundary, float16 weights): explained in float32 with the float16 weights; against a torch
    float64 module holding the same (float16-rounded) weights, within float32 rounding."""
    net = _net()
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    mixed = cast_model(export(net, torch.tensor(x), keep_bn=True), TensorProto.FLOAT16, keep_io=True)
    assert {a.i for n in mixed.graph.node if n.op_type == "Cast" for a in n.attribute} == \
        {TensorProto.FLOAT16, TensorProto.FLOAT}
    res = dconnx.convert(mixed, methods="splitgrad", alpha=0.5)
    assert len(_applied(res, "unify_float_types")) == 1
    assert {i.type.tensor_type.elem_type for i in res.model.graph.input if i.name == "input"} == {TensorProto.FLOAT}

    ref = copy.deepcopy(net).double()
    with torch.no_grad():       # the float16 file's weights and BatchNorm statistics
        for p in list(ref.parameters()) + list(ref.buffers()):
            if p.is_floating_point():
                p.copy_(p.half().double())
    f, half_grad = _splitgrad_reference(ref, x, np.array([1, 3]))
    out = run(res.model, x, target=np.array([1, 3]))
    assert rel_err(out["logits"], f) < 1e-5
    assert rel_err(out["g"] - out["h"], f) < 1e-5
    assert np.abs(half_grad).max() > 0
    assert rel_err(out["splitgrad"], half_grad) < 1e-4
    # rounding the weights to float16 moved the logits well above float32 rounding: the check
    # above sees the float16 weights
    f32, _ = _splitgrad_reference(copy.deepcopy(net).double(), x, np.array([1, 3]))
    assert rel_err(f32, f) > 100 * rel_err(out["logits"], f)


class _Island(nn.Module):
    """A float64 network whose middle block runs in float32 (an exporter writes Cast to float
    and Cast back to double around it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()).double()
        self.mid = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 4)).double()

    def forward(self, x):
        return self.b(self.mid(self.a(x).float()).double())


def test_float32_island_in_a_float64_model_is_exact_in_float64():
    """Explained in float64 (its input's type), the island's Casts being identities: g − h and
    SplitGrad at α = 0.5 against torch float64 autograd of the cast-free module to 1e-12."""
    module = _Island().eval()
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6))
    model = export(module, torch.tensor(x))
    casts = {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute}
    assert {TensorProto.FLOAT, TensorProto.DOUBLE} <= casts
    res = dconnx.convert(model, methods="splitgrad", alpha=0.5, share_forward=False)
    assert _applied(res, "unify_float_types")
    cast_free = copy.deepcopy(module)
    cast_free.mid.double()
    cast_free.forward = lambda x: cast_free.b(cast_free.mid(cast_free.a(x)))
    t = np.array([0, 2])
    f, half_grad = _splitgrad_reference(cast_free, x, t)
    out = run(res.model, x, target=t)
    assert np.abs(half_grad).max() > 0
    assert rel_err(out["g"] - out["h"], f) < 1e-12
    assert rel_err(out["splitgrad"], half_grad) < 1e-12


def test_cast_of_data_to_an_integer_type_is_refused(tmp_path, capsys):
    with pytest.raises(dconnx.UnsupportedOpError, match="the_cast.*Cast.*non-float.*not differentiable"):
        dconnx.convert(_model(TensorProto.INT64))
    src = tmp_path / "m.onnx"
    onnx.save(_model(TensorProto.INT32), src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "not differentiable" in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()
