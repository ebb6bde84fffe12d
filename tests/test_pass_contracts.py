"""Pass contracts: every pass's `ensures` runs in every conversion the tests make (conftest sets
DCONNX_DEBUG=1, which reaches CLI subprocesses too), and a pass that breaks its promise is
caught by its own ensures with an error naming the pass and what is missing."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dconnx
from dconnx.passes import ContractError, Pass, contracts_enabled
from dconnx.passes.backward import Backward
from dconnx.passes.canonicalize import Canonicalize
from dconnx.passes.heads import Heads
from dconnx.passes.optimize import Optimize
from dconnx.passes.preflight import Preflight
from dconnx.passes.split import Split

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx"
PASSES = (Preflight, Canonicalize, Split, Backward, Heads, Optimize)


@pytest.fixture(scope="module")
def fixture_model():
    return onnx.load(FIXTURE)


def _copy(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def test_contracts_are_on_in_the_tests_and_in_cli_subprocesses():
    assert os.environ.get("DCONNX_DEBUG") == "1" and contracts_enabled()
    code = "from dconnx.passes import contracts_enabled; print(contracts_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_contracts_follow_the_environment(monkeypatch):
    monkeypatch.setenv("DCONNX_DEBUG", "0")
    assert not contracts_enabled() and contracts_enabled(debug=True)
    monkeypatch.delenv("DCONNX_DEBUG")
    assert not contracts_enabled()


def test_every_pass_states_a_postcondition():
    for p in PASSES:
        assert p.ensures is not Pass.ensures, f"{p.__name__} has no ensures"


def test_every_ensures_runs_in_a_conversion(fixture_model, monkeypatch):
    called = []
    for p in PASSES:
        original = p.ensures

        def spy(self, comp, _original=original):
            called.append(self.name)
            return _original(self, comp)
        monkeypatch.setattr(p, "ensures", spy)
    dconnx.convert(_copy(fixture_model), methods="splitgrad,splitlrp,gradient", layer=3)
    assert called == [p.name for p in PASSES]


def _break_after_run(monkeypatch, cls, damage):
    original = cls.run

    def run(self, comp):
        result = original(self, comp)
        damage(comp)
        return result
    monkeypatch.setattr(cls, "run", run)


def _convert_broken(model, pass_name, match, **kwargs):
    with pytest.raises(ContractError, match=match) as err:
        dconnx.convert(model, **kwargs)
    assert err.value.pass_name == pass_name
    assert str(err.value).startswith(f"{pass_name} pass broke its contract: ")


def _sigmoid_model():
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Exp", ["c"], ["s"], name="the_exp"),
             helper.make_node("GlobalAveragePool", ["s"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["logits"], name="flatten")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_preflight_that_lets_an_unsupported_op_through_is_caught(monkeypatch):
    from dconnx.passes import preflight
    monkeypatch.setattr(preflight, "_reason", lambda view, node, final=False: None)
    _convert_broken(_sigmoid_model(), "preflight", "the_exp.*Exp.*no rule")


def test_a_canonicalize_that_leaves_a_flatten_is_caught(fixture_model, monkeypatch):
    monkeypatch.setattr(Canonicalize, "flatten_to_reshape", lambda self, ed, res: None)
    _convert_broken(_copy(fixture_model), "canonicalize", "Flatten.*survived canonicalization")


def test_a_split_that_misses_a_stream_is_caught(fixture_model, monkeypatch):
    def damage(comp):
        relu = next(n for n in comp.model.graph.node if n.op_type == "Relu")
        del comp.streams[relu.output[0]]
    _break_after_run(monkeypatch, Split, damage)
    _convert_broken(_copy(fixture_model), "split", "no streams for the data tensor")


def test_a_backward_that_misses_a_sensitivity_is_caught(fixture_model, monkeypatch):
    def damage(comp):
        key = next(k for k in comp.cotangents if k[0] == "splitlrp")
        del comp.cotangents[key]
    _break_after_run(monkeypatch, Backward, damage)
    _convert_broken(_copy(fixture_model), "backward", "no splitlrp sensitivity at",
                    methods="splitgrad,splitlrp", layer=3)


def test_a_backward_sensitivity_of_the_wrong_form_is_caught(fixture_model, monkeypatch):
    def damage(comp):
        key = next(k for k in comp.cotangents if k[0] == "split")
        comp.cotangents[key] = comp.cotangents[key][:1]
    _break_after_run(monkeypatch, Backward, damage)
    _convert_broken(_copy(fixture_model), "backward", "not 2 parts", methods="splitgrad")


def test_heads_that_drop_a_map_are_caught(fixture_model, monkeypatch):
    def damage(comp):
        comp.new_outputs[:] = [vi for vi in comp.new_outputs if vi.name != "splitcam"]
    _break_after_run(monkeypatch, Heads, damage)
    _convert_broken(_copy(fixture_model), "heads", "no output for splitcam", methods="splitgrad,splitcam",
                    layer=3)


def test_heads_that_declare_a_wrong_rank_are_caught(fixture_model, monkeypatch):
    def damage(comp):
        vi = next(vi for vi in comp.new_outputs if vi.name == "splitgrad")
        vi.type.tensor_type.shape.dim.add().dim_value = 1
    _break_after_run(monkeypatch, Heads, damage)
    _convert_broken(_copy(fixture_model), "heads", "declared with rank 4, not 3")


def test_an_optimize_result_failing_strict_shape_inference_is_caught(fixture_model, monkeypatch):
    """With check=False the run skips the checker; the contract still runs it."""
    from dconnx.passes import optimize
    original = optimize.assemble

    def assemble(comp):
        model = original(comp)
        g = next(o for o in model.graph.output if o.name == "g")
        g.type.tensor_type.shape.dim[1].dim_value += 1      # declared [batch, k + 1]: computes [batch, k]
        return model
    monkeypatch.setattr(optimize, "assemble", assemble)
    _convert_broken(_copy(fixture_model), "optimize", "strict shape inference|declared", check=False)


def test_an_optimize_sensitivity_of_the_wrong_rank_is_caught(fixture_model, monkeypatch):
    """The rank of a sensitivity is checked on the final graph's inferred shapes."""
    def damage(comp):
        relu = next(n for n in comp.model.graph.node if n.op_type == "Relu")
        comp.cotangents[("split", relu.output[0])] = (comp.seed, comp.seed)   # [batch, classes] at a 4-D layer
    _break_after_run(monkeypatch, Backward, damage)
    _convert_broken(_copy(fixture_model), "optimize", "has rank 2, not 4", methods="splitgrad")


def test_without_contracts_a_broken_split_goes_unnoticed_by_the_passes(fixture_model, monkeypatch):
    """What the contract adds: the same damage, contracts off, is not reported by any pass."""
    monkeypatch.setenv("DCONNX_DEBUG", "0")

    def damage(comp):
        comp.notes.append("damaged")
        relu = [n for n in comp.model.graph.node if n.op_type == "Relu"][-1]
        comp.streams.pop(relu.output[0])
    _break_after_run(monkeypatch, Split, damage)
    dconnx.convert(_copy(fixture_model), methods="splitgrad")
