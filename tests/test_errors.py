"""Bad input gives the right DconnxError, exit code 2 from the CLI, and no output file."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import dconnx
from dconnx.cli import main
from helpers import export


@pytest.fixture(scope="module")
def good_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 3))
    return export(m, torch.zeros(1, 3, 8, 8))


def _graph_with(ops_and_names):
    """input -> Conv -> each listed op in turn -> flatten -> logits."""
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["t0"], name="conv")]
    prev = "t0"
    for i, (op, name) in enumerate(ops_and_names):
        nodes.append(helper.make_node(op, [prev], [f"t{i + 1}"], name=name))
        prev = f"t{i + 1}"
    nodes.append(helper.make_node("Flatten", [prev], ["logits"], name="flatten"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 5, 5])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 18])],
                          initializer=[w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_truncated_file(tmp_path, good_model):
    path = tmp_path / "trunc.onnx"
    data = good_model.SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dconnx.InvalidModelError):
        dconnx.convert(path)


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    with pytest.raises(dconnx.InvalidModelError, match="not an ONNX model"):
        dconnx.convert(path)


def test_missing_file(tmp_path):
    with pytest.raises(dconnx.InvalidModelError, match="no model file"):
        dconnx.convert(tmp_path / "nope.onnx")


def test_unsupported_ops_are_all_listed():
    model = _graph_with([("Exp", "act1"), ("Relu", "ok"), ("Log", "act2"), ("Reciprocal", "act3")])
    with pytest.raises(dconnx.UnsupportedOpError) as info:
        dconnx.convert(model)
    names = [n for n, _, _ in info.value.nodes]
    assert names == ["act1", "act2", "act3"]
    text = str(info.value)
    for name, op in (("act1", "Exp"), ("act2", "Log"), ("act3", "Reciprocal")):
        assert f"'{name}' ({op})" in text
    assert "never approximated" in text


def test_division_by_a_data_tensor_is_refused():
    """Products of data tensors convert (polarization); a data divisor has no exact rule."""
    model = _graph_with([("Relu", "r")])
    g = model.graph
    g.node.insert(2, helper.make_node("Div", ["t1", "t1"], ["q"], name="ratio"))
    g.node[-1].input[0] = "q"
    with pytest.raises(dconnx.UnsupportedOpError, match="ratio.*division by a data-dependent tensor"):
        dconnx.convert(model)


def test_graph_failing_the_checker():
    model = _graph_with([("Relu", "r")])
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(dconnx.InvalidModelError, match="checker"):
        dconnx.convert(model)


def test_non_float_input_is_refused():
    model = _graph_with([("Relu", "r")])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(dconnx.DconnxError):
        dconnx.convert(model)


def test_bad_options():
    model = _graph_with([("Relu", "r")])
    with pytest.raises(dconnx.OptionError, match="alpha"):
        dconnx.convert(model, methods="splitgrad", alpha=0.7)
    with pytest.raises(dconnx.OptionError, match="unknown method"):
        dconnx.convert(model, methods="splitgrad,shap")
    with pytest.raises(dconnx.OptionError, match="maxpool"):
        dconnx.convert(model, maxpool="avg")
    with pytest.raises(dconnx.LayerError, match="neither an index nor"):
        dconnx.convert(model, methods="splitgrad", layer="no_such_tensor")
    with pytest.raises(dconnx.LayerError, match="outside the feature chain"):
        dconnx.convert(model, methods="splitgrad", layer=40)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "unsupported", "checker"])
def test_cli_exit_code_2_and_no_output(tmp_path, good_model, capsys, kind):
    src = tmp_path / "in.onnx"
    if kind == "truncated":
        data = good_model.SerializeToString()
        src.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        src.write_bytes(b"\x00\x01garbage" * 50)
    elif kind == "unsupported":
        onnx.save(_graph_with([("Exp", "act1"), ("Log", "act2")]), src)
    else:
        bad = _graph_with([("Relu", "r")])
        bad.graph.node[1].input[0] = "undefined_tensor"
        onnx.save(bad, src)
    out = tmp_path / "out" / "model.dc.onnx"
    code = main(["convert", str(src), "-o", str(out), "--methods", "splitgrad"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dconnx: error:")
    if kind == "unsupported":
        assert "act1" in err and "act2" in err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_writes_output_on_success(tmp_path, good_model, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(good_model, src)
    out = tmp_path / "model.dc.onnx"
    assert main(["convert", str(src), "-o", str(out), "--methods", "splitgrad,splitcam,splitlrp"]) == 0
    assert out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    printed = capsys.readouterr().out
    assert "splitgrad" in printed and "wrote" in printed
    converted = onnx.load(out)
    names = [o.name for o in converted.graph.output]
    assert names == ["logits", "g", "h", "splitgrad", "splitcam", "splitlrp"]
