"""`dconnx export-triton`: the repository layout, config.pbtxt parsed against Triton's ModelConfig
message with protobuf's text format, the ONNX Runtime backend's load-time rules, and a round trip
that feeds the repository's model the way Triton would and compares with the Explainer.

Triton's schema: tritonclient ships the compiled model_config.proto as tritonclient/grpc/
model_config_pb2.py. Importing that module needs grpc and a matching protobuf gencode version,
so the test reads the serialized FileDescriptorProto out of its source (with ast, not executing
it) and builds the `inference.ModelConfig` class in a private descriptor pool.
"""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import dconnx
from dconnx.errors import InvalidModelError, OptionError
from dconnx.runtime import Explainer
from dconnx.serve.triton import export_triton

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
METHODS = ["splitgrad", "splitcam", "splitlrp"]
ONNX_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(double)": "TYPE_FP64"}


def model_config_class():
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient (Triton's model_config_pb2) is not installed: pip install '.[test]'")
    src = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    blobs = [n.value for n in ast.walk(ast.parse(src.read_text()))
             if isinstance(n, ast.Constant) and isinstance(n.value, bytes)
             and n.value.startswith(b"\n\x12model_config.proto")]
    assert len(blobs) == 1, f"no serialized model_config.proto in {src}"
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(blobs[0]))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


@pytest.fixture(scope="module")
def ModelConfig():
    return model_config_class()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods=",".join(METHODS), layer=10)
    return out


def parse(ModelConfig, path: Path):
    from google.protobuf import text_format
    cfg = ModelConfig()
    text_format.Parse(path.read_text(), cfg)     # raises ParseError on any unknown field or bad value
    return cfg


def check_backend_rules(cfg, model_path: Path):
    """What Triton's ONNX Runtime backend checks when it loads the model (ValidateInputs/Outputs)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    required = {i.name: i for i in sess.get_inputs()}
    overridable = {i.name: i for i in sess.get_overridable_initializers()}
    outputs = {o.name: o for o in sess.get_outputs()}
    mbs = cfg.max_batch_size
    assert sum(not i.optional for i in cfg.input) == len(required), "config and model disagree on required inputs"

    def check(io, info):
        assert ONNX_TO_TRITON[info.type] == io_type_name(io), io.name
        model_dims = [d if isinstance(d, int) else -1 for d in info.shape]
        dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
        if not model_dims:          # a scalar: every configured dim is 1
            assert all(d == 1 for d in io.dims) and (mbs == 0 or io.HasField("reshape")), io.name
            return
        if mbs > 0:
            assert model_dims[0] == -1, f"{io.name} has no batch axis"
            model_dims = model_dims[1:]
        assert len(dims) == len(model_dims), io.name
        for d, m in zip(dims, model_dims):
            assert m == -1 or d == m, f"{io.name}: config {dims}, model {model_dims}"

    for io in cfg.input:
        assert not (io.optional and mbs > 0), "optional inputs are refused on batching models"
        info = required.get(io.name) or overridable.get(io.name)
        assert info is not None, f"config input {io.name} is not a model input"
        assert io.optional == (io.name in overridable), io.name
        check(io, info)
    assert {o.name for o in cfg.output} == set(outputs)
    for io in cfg.output:
        check(io, outputs[io.name])
    return sess


def io_type_name(io) -> str:
    return type(io).DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[io.data_type].name


def test_repository_layout_and_config(model, tmp_path, ModelConfig):
    res = export_triton(model, tmp_path / "repo", max_batch_size=8, preferred_batch_sizes=[4, 8])
    entry = tmp_path / "repo" / "fixture"
    assert res.config_path == entry / "config.pbtxt" and res.model_path == entry / "1" / "model.onnx"
    assert res.model_path.read_bytes() == model.read_bytes()
    cfg = parse(ModelConfig, res.config_path)
    assert cfg.name == "fixture" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["input"] and list(cfg.input[0].dims) == [3, 64, 64]
    assert io_type_name(cfg.input[0]) == "TYPE_FP32"
    dims = {o.name: list(o.dims) for o in cfg.output}
    assert dims == {"logits": [4], "g": [4], "h": [4], **{m: [64, 64] for m in METHODS}}
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert len(res.notes) == 2 and all("optional" in n for n in res.notes)     # target, alpha left out
    check_backend_rules(cfg, res.model_path)


def test_schema_check_is_strict(ModelConfig):
    """The parser refuses what Triton would: unknown fields, unknown enum values, wrong types."""
    from google.protobuf import text_format
    for bad in ('name: "m"\nmax_batch_sizes: 8', 'input [ { name: "x" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]',
                "max_batch_size: eight", 'dynamic_batching { max_queue_delay: 5 }'):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad, ModelConfig())


def test_round_trip_as_triton_runs_it(model, tmp_path, ModelConfig):
    """Parse → print → parse gives the same message; requests batched along axis 0 and fed with
    only the configured inputs give the Explainer's outputs, sliced back per request."""
    from google.protobuf import text_format
    res = export_triton(model, tmp_path / "repo", max_batch_size=8)
    cfg = parse(ModelConfig, res.config_path)
    again = ModelConfig()
    text_format.Parse(text_format.MessageToString(cfg), again)
    assert again == cfg and again.SerializeToString(deterministic=True) == cfg.SerializeToString(deterministic=True)
    sess = check_backend_rules(cfg, res.model_path)
    requests = [np.random.default_rng(i).standard_normal((1, *cfg.input[0].dims)).astype(np.float32)
                for i in range(5)]
    batch = np.concatenate(requests)                       # what the dynamic batcher hands the backend
    assert batch.shape[0] <= cfg.max_batch_size
    outs = dict(zip([o.name for o in sess.get_outputs()],
                    sess.run([o.name for o in cfg.output], {cfg.input[0].name: batch})))
    ref = Explainer(model, providers=["CPUExecutionProvider"])(batch)
    for o in cfg.output:
        assert outs[o.name].shape[1:] == tuple(o.dims)
        np.testing.assert_allclose(outs[o.name], ref[o.name], rtol=1e-6, atol=1e-6)


def test_unbatched_config_exposes_optional_target_and_alpha(model, tmp_path, ModelConfig):
    res = export_triton(model, tmp_path / "repo", name="fixture_nobatch", max_batch_size=0, instance_kind="cpu")
    cfg = parse(ModelConfig, res.config_path)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    by_name = {i.name: i for i in cfg.input}
    assert list(by_name["input"].dims) == [-1, 3, 64, 64] and not by_name["input"].optional
    assert by_name["target"].optional and list(by_name["target"].dims) == [-1]
    assert io_type_name(by_name["target"]) == "TYPE_INT64"
    assert by_name["alpha"].optional and list(by_name["alpha"].dims) == [1]
    assert list({o.name: o for o in cfg.output}["splitcam"].dims) == [-1, 64, 64]
    kind = type(cfg.instance_group[0]).DESCRIPTOR.fields_by_name["kind"].enum_type
    assert kind.values_by_number[cfg.instance_group[0].kind].name == "KIND_CPU"
    sess = check_backend_rules(cfg, res.model_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = sess.run(["splitgrad"], {"input": x, "target": np.array([1, 3]), "alpha": np.array(0.2, np.float32)})[0]
    want = Explainer(model, providers=["CPUExecutionProvider"]).maps(x, target=[1, 3], alpha=0.2)["splitgrad"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_refusals(model, tmp_path):
    export_triton(model, tmp_path / "repo")
    with pytest.raises(OptionError, match="exists"):
        export_triton(model, tmp_path / "repo")
    export_triton(model, tmp_path / "repo", overwrite=True)
    with pytest.raises(OptionError, match="model name"):
        export_triton(model, tmp_path / "repo", name="bad name")
    with pytest.raises(OptionError, match="preferred"):
        export_triton(model, tmp_path / "repo2", preferred_batch_sizes=[16], max_batch_size=8)
    with pytest.raises(InvalidModelError, match="dconnx convert"):
        export_triton(FIXTURE, tmp_path / "repo3")
    fixed = onnx.load(str(model))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2     # no dynamic batch axis
    onnx.save(fixed, str(tmp_path / "fixed.dc.onnx"))
    with pytest.raises(OptionError, match="max-batch-size 0"):
        export_triton(tmp_path / "fixed.dc.onnx", tmp_path / "repo4")


def test_cli_export_triton(model, tmp_path, ModelConfig):
    proc = subprocess.run([sys.executable, "-m", "dconnx", "export-triton", str(model), str(tmp_path / "repo"),
                           "--name", "cnn", "--max-batch-size", "4", "--preferred-batch-sizes", "2,4",
                           "--instances", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "config.pbtxt" in proc.stdout and "note:" in proc.stdout
    cfg = parse(ModelConfig, tmp_path / "repo" / "cnn" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and cfg.instance_group[0].count == 2
    proc = subprocess.run([sys.executable, "-m", "dconnx", "export-triton", str(FIXTURE), str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "dconnx convert" in proc.stderr
