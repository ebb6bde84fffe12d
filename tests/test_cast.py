"""Cast on float data: to its own type it is removed (exact); to another float type it would
mix precisions inside the converted graph and is refused with the node and the reason."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dconnx
from dconnx.cli import main
from helpers import run


def _model(to: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["cast"], name="the_cast", to=to),
             helper.make_node("Cast", ["cast"], ["back"], name="cast_back", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["back"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="gemm", transB=1)]
    g = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          initializer=[w, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_cast_to_the_same_float_type_is_removed_exactly():
    res = dconnx.convert(_model(TensorProto.FLOAT), methods="splitgrad", alpha=0.5)
    assert any("remove_identity: " in a and "Cast" in a for p in res.report.passes for a in p.applied)
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    out = run(res.model, x)
    assert np.abs(out["g"] - out["h"] - out["logits"]).max() <= 1e-5 * np.abs(out["logits"]).max()


def test_cast_to_another_float_type_is_refused(tmp_path, capsys):
    with pytest.raises(dconnx.UnsupportedOpError, match="the_cast.*Cast.*mixed precision"):
        dconnx.convert(_model(TensorProto.FLOAT16))
    src = tmp_path / "m.onnx"
    onnx.save(_model(TensorProto.DOUBLE), src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "mixed precision" in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()
