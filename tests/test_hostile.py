"""Hostile and malformed model files: each is refused with a specific DconnxError whose
message names the problem, by the API and by the CLI (exit code 2), and nothing is written.

The table covers damaged files (truncated, empty, other formats), bad headers (IR version,
opsets), broken graphs (cycles, dangling inputs, missing initializers, shape mismatches,
duplicates), bad declarations (non-float inputs, zero-size and huge dims, bad tensor data,
NaN/Inf constants) and external data that points outside the model's folder (path
traversal, absolute paths, symbolic links) or is missing, truncated or overlapping.
Two properties follow: every truncation of a valid file is refused, and random byte
corruption gives a converted model or a DconnxError, never another exception.
"""
from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import dconnx
from dconnx.cli import main

InvalidModel = dconnx.InvalidModelError
Unsupported = dconnx.UnsupportedOpError


def base_model(head: str = "gemm") -> onnx.ModelProto:
    """input [N, 3, 8, 8] → Conv → Relu → (Flatten → Gemm | GlobalAveragePool → Flatten) → logits."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    if head == "gemm":
        inits += [numpy_helper.from_array(rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32), "fw"),
                  numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb")]
        nodes += [helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
                  helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
        n_out = 5
    else:
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flatten")]
        n_out = 4
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", n_out])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _set_init(m, name, array):
    _init(m, name).CopyFrom(numpy_helper.from_array(np.asarray(array), name))


def _dim(m, axis, value):
    d = m.graph.input[0].type.tensor_type.shape.dim[axis]
    if isinstance(value, str):
        d.dim_param = value
    else:
        d.dim_value = value


def _write(tmp: Path, data: bytes, name: str = "model.onnx") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _mutated(fn: Callable[[onnx.ModelProto], None], head: str = "gemm"):
    """A case: the base model changed by `fn`, written to a file."""
    def make(tmp: Path):
        m = base_model(head)
        fn(m)
        return _write(tmp, m.SerializeToString())
    return make


def _external(fn: Callable[[onnx.ModelProto, Path], None] | None = None, *, loc: str = "weights.data"):
    """A case: the base model with its weights in `weights.data` beside it; `fn` then edits the
    model (its external data entries) and the folder."""
    def make(tmp: Path):
        folder = tmp / "model"
        folder.mkdir()
        m = base_model()
        onnx.external_data_helper.convert_model_to_external_data(
            m, all_tensors_to_one_file=True, location="weights.data", size_threshold=0)
        onnx.save_model(m, str(folder / "model.onnx"))
        m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        if fn is not None:
            fn(m, folder)
        return _write(folder, m.SerializeToString())
    return make


def _ext_entry(m, tensor, key, value):
    t = _init(m, tensor)
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


def _all_locations(m, value):
    for t in m.graph.initializer:
        _ext_entry(m, t.name, "location", value)


def _secret(tmp: Path) -> Path:
    """A file outside the model's folder that a hostile model wants read."""
    path = tmp / "secret.bin"
    path.write_bytes(np.arange(2000, dtype=np.float32).tobytes())
    return path


def _symlinked_file(m, folder):
    os.symlink(_secret(folder.parent), folder / "link.data")
    _ext_entry(m, "w", "location", "link.data")
    _ext_entry(m, "w", "offset", "0")


def _symlinked_dir(m, folder):
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "weights.data").write_bytes((folder / "weights.data").read_bytes())
    os.symlink(outside, folder / "sub")
    _all_locations(m, "sub/weights.data")


def _truncate_data(m, folder):
    data = (folder / "weights.data").read_bytes()
    (folder / "weights.data").write_bytes(data[: len(data) - 100])


def _overlap(m, folder):
    _ext_entry(m, "fb", "offset", "0")     # fb reads the bytes of w


def _torch_checkpoint(tmp: Path) -> Path:
    import torch
    path = tmp / "model.onnx"
    torch.save({"w": torch.zeros(3)}, path)
    return path


def _sparse_huge(tmp: Path) -> Path:
    path = tmp / "model.onnx"
    with open(path, "wb") as f:
        f.truncate(3 * 2**30)   # sparse: no disk used
    return path


def _rewire(node: int, slot: int, name: str, output: bool = False):
    def edit(m):
        (m.graph.node[node].output if output else m.graph.node[node].input)[slot] = name
    return edit


def _cycle(m):
    m.graph.node[0].input[0] = "r"          # conv reads relu's output, relu reads conv's


def _unsorted(m):
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([nodes[1], nodes[0]] + nodes[2:])


def _add_node(m, node, at=0):
    m.graph.node.insert(at, node)


def _custom_domain(m):
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _only_custom_opset(m):
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _float_data_short(m):
    t = _init(m, "w")
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 5)


def _raw_short(m):
    _init(m, "w").raw_data = _init(m, "w").raw_data[:10]


def _huge_init(m):
    t = _init(m, "w")
    t.ClearField("raw_data")
    del t.dims[:]
    t.dims.extend([2**40, 2**40])


def _negative_dims(m):
    t = _init(m, "b")
    del t.dims[:]
    t.dims.extend([-4])


def _weights_nan(m):
    w = numpy_helper.to_array(_init(m, "w")).copy()
    w[1, 2, 0, 0] = np.nan
    _set_init(m, "w", w)


def _bias_inf(m):
    _set_init(m, "b", np.array([0, np.inf, 0, 0], np.float32))


def _bn_nan_epsilon(m):
    for k, name in enumerate(("s", "o", "mu", "var")):
        m.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), name))
    m.graph.node.insert(1, helper.make_node("BatchNormalization", ["c", "s", "o", "mu", "var"], ["bn"],
                                            name="bn", epsilon=float("nan")))
    m.graph.node[2].input[0] = "bn"


def _bn_wrong_length(m):
    for name in ("s", "o", "mu", "var"):
        m.graph.initializer.append(numpy_helper.from_array(np.ones(5, np.float32), name))
    m.graph.node.insert(1, helper.make_node("BatchNormalization", ["c", "s", "o", "mu", "var"], ["bn"],
                                            name="bn"))
    m.graph.node[2].input[0] = "bn"


def _node_attr(node: int, **kw):
    def edit(m):
        n = m.graph.node[node]
        for key, value in kw.items():
            for a in [a for a in n.attribute if a.name == key]:
                n.attribute.remove(a)
            n.attribute.append(helper.make_attribute(key, value))
    return edit


def _pool_over_input(m):
    m.graph.node.insert(2, helper.make_node("AveragePool", ["r"], ["ap"], name="pool", kernel_shape=[9, 9]))
    m.graph.node[3].input[0] = "ap"


def _invalid_utf8_name(tmp: Path) -> Path:
    m = base_model()
    m.graph.node[0].name = "convX"
    return _write(tmp, m.SerializeToString().replace(b"convX", b"conv\xff"))


def _no_data_input(m):
    # the only input is also an initializer: nothing is fed at run time
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 3, 8, 8), np.float32), "input"))


@dataclass
class Case:
    name: str
    make: Callable[[Path], object]          # tmp folder -> path, bytes or ModelProto
    error: type
    match: str


CASES = [
    # damaged files and other formats
    Case("truncated_protobuf", lambda t: _write(t, base_model().SerializeToString()[:1000]),
         InvalidModel, "not an ONNX model, or a truncated one"),
    Case("truncated_to_header", lambda t: _write(t, base_model().SerializeToString()[:5]),
         InvalidModel, "not an ONNX model"),
    Case("empty_file", lambda t: _write(t, b""), InvalidModel, "is empty"),
    Case("random_bytes", lambda t: _write(t, np.random.default_rng(0).bytes(4096)),
         InvalidModel, "not an ONNX model"),
    Case("wrong_magic_pytorch_checkpoint", _torch_checkpoint, InvalidModel, "ZIP archive.*PyTorch"),
    Case("wrong_magic_png", lambda t: _write(t, b"\x89PNG\r\n\x1a\n" + bytes(200)), InvalidModel, "PNG image"),
    Case("wrong_magic_hdf5", lambda t: _write(t, b"\x89HDF\r\n\x1a\n" + bytes(200)), InvalidModel, "HDF5"),
    Case("wrong_magic_tflite", lambda t: _write(t, b"\x1c\x00\x00\x00TFL3" + bytes(200)),
         InvalidModel, "TensorFlow Lite"),
    Case("gzip_compressed_model", lambda t: _write(t, gzip.compress(base_model().SerializeToString())),
         InvalidModel, "gzip"),
    Case("text_file", lambda t: _write(t, b"this is not a model\n" * 20), InvalidModel, "text"),
    Case("model_without_graph", lambda t: _write(t, onnx.ModelProto(ir_version=8, producer_name="x")
                                                 .SerializeToString()), InvalidModel, "no graph or no nodes"),
    Case("file_over_2gib", _sparse_huge, InvalidModel, "2 GiB"),
    Case("missing_file", lambda t: t / "nope.onnx", InvalidModel, "no model file"),
    Case("directory_not_file", lambda t: t, InvalidModel, "no model file"),
    # header
    Case("opset_too_new", _mutated(lambda m: setattr(m.opset_import[0], "version", 99)),
         InvalidModel, "opset 99; the newest .* is 26"),
    Case("ir_version_too_new", _mutated(lambda m: setattr(m, "ir_version", 99)),
         InvalidModel, "IR version 99; the newest .* is 13"),
    Case("ir_version_missing", _mutated(lambda m: setattr(m, "ir_version", 0)), InvalidModel, "no IR version"),
    Case("no_default_opset", _mutated(_only_custom_opset), InvalidModel, "default ONNX opset"),
    # graph structure
    Case("cyclic_graph", _mutated(_cycle), InvalidModel, "cycle: node 'conv' .*node 'relu'"),
    Case("self_loop", _mutated(_rewire(1, 0, "r")), InvalidModel, "cycle: .*'relu'"),
    Case("not_topologically_sorted", _mutated(_unsorted), InvalidModel, "not in topological order"),
    Case("dangling_input", _mutated(_rewire(1, 0, "nowhere")),
         InvalidModel, "'relu' .*reads 'nowhere'.*dangling input"),
    Case("missing_initializer", _mutated(lambda m: m.graph.initializer.remove(_init(m, "w"))),
         InvalidModel, "'conv' .*reads 'w'.*missing initializer"),
    Case("output_not_produced", _mutated(lambda m: setattr(m.graph.output[0], "name", "ghost")),
         InvalidModel, "output 'ghost' is not produced"),
    Case("no_outputs", _mutated(lambda m: m.graph.ClearField("output")), InvalidModel, "no outputs"),
    Case("no_data_input", _mutated(_no_data_input), InvalidModel, "no data input"),
    Case("tensor_written_twice", _mutated(_rewire(1, 0, "c", output=True)),
         InvalidModel, "'c' is written by two nodes"),
    Case("node_overwrites_input", _mutated(lambda m: _add_node(m, helper.make_node("Relu", ["input"], ["input"],
                                                                                   name="evil"))),
         InvalidModel, "'evil' .*overwrites 'input'"),
    Case("duplicate_node_names", _mutated(lambda m: setattr(m.graph.node[1], "name", "conv")),
         InvalidModel, "node name 'conv' is used twice"),
    # shapes
    Case("conv_channel_mismatch", _mutated(lambda m: _set_init(m, "w", np.ones((4, 2, 3, 3), np.float32))),
         InvalidModel, "'conv'.*3 channels.*needs 2"),
    Case("conv_bias_length", _mutated(lambda m: _set_init(m, "b", np.ones(3, np.float32))),
         InvalidModel, "'conv'.*bias shape \\[3\\]"),
    Case("conv_kernel_shape_mismatch", _mutated(_node_attr(0, kernel_shape=[5, 5]), head="gap"),
         InvalidModel, "'conv'.*kernel_shape \\[5, 5\\] differs from the weight's \\[3, 3\\]"),
    Case("conv_zero_groups", _mutated(_node_attr(0, group=0)), InvalidModel, "cannot form 0 groups"),
    Case("invalid_auto_pad", _mutated(_node_attr(0, auto_pad="WHAT")), InvalidModel, "auto_pad 'WHAT'"),
    Case("pool_kernel_larger_than_input", _mutated(_pool_over_input, head="gap"),
         InvalidModel, "'ap' has a negative dimension"),
    Case("gemm_shape_mismatch", _mutated(lambda m: _set_init(m, "fw", np.ones((5, 7), np.float32))),
         InvalidModel, "checker.*Gemm.*mismatch"),
    Case("batchnorm_parameter_length", _mutated(_bn_wrong_length), InvalidModel, "checker.*BatchNormalization.*mismatch"),
    Case("dynamic_spatial_dim", _mutated(lambda m: _dim(m, 2, "H"), head="gap"),
         InvalidModel, "dynamic dimension 'H' on axis 2"),
    Case("zero_size_channels", _mutated(lambda m: _dim(m, 1, 0)), InvalidModel, "zero-size dimension"),
    Case("zero_size_batch", _mutated(lambda m: _dim(m, 0, 0)), InvalidModel, "zero-size dimension"),
    Case("huge_declared_dims", _mutated(lambda m: (_dim(m, 2, 10**9), _dim(m, 3, 10**9)), head="gap"),
         InvalidModel, "3000000000000000000 elements"),
    Case("huge_initializer_dims", _mutated(_huge_init), InvalidModel, "'w' declares 1208925819614629174706176"),
    Case("negative_initializer_dims", _mutated(_negative_dims), InvalidModel, "'b' has a negative dimension"),
    # element types and tensor data
    Case("int64_input", _mutated(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TP.INT64)),
         InvalidModel, "element type INT64; dconnx explains float inputs only"),
    Case("uint8_input", _mutated(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TP.UINT8)),
         InvalidModel, "element type UINT8"),
    Case("string_input", _mutated(lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TP.STRING)),
         InvalidModel, "element type STRING"),
    Case("input_without_shape", _mutated(lambda m: m.graph.input[0].type.tensor_type.ClearField("shape")),
         InvalidModel, "declares no shape"),
    Case("raw_data_too_short", _mutated(_raw_short), InvalidModel, "'w' holds 10 bytes.*needs 432"),
    Case("float_data_too_short", _mutated(_float_data_short), InvalidModel, "'w' holds 5 values.*needs 108"),
    Case("unknown_element_type", _mutated(lambda m: setattr(_init(m, "w"), "data_type", 0)),
         InvalidModel, "'w' has an unknown element type"),
    Case("nan_weight", _mutated(_weights_nan), InvalidModel, "'w' contains NaN"),
    Case("inf_bias", _mutated(_bias_inf), InvalidModel, "'b' contains ±Inf"),
    Case("nan_attribute", _mutated(_bn_nan_epsilon), InvalidModel, "attribute 'epsilon' of node 'bn'.*NaN"),
    Case("inf_attribute", _mutated(_node_attr(3, alpha=float("inf"))), InvalidModel, "'alpha' of node 'fc'.*Inf"),
    Case("invalid_utf8_name", _invalid_utf8_name, InvalidModel, "not valid UTF-8"),
    Case("custom_domain_node", _mutated(_custom_domain), Unsupported, "custom domain 'com.example'"),
    # external data
    Case("external_path_traversal", _external(lambda m, f: (_secret(f.parent), _all_locations(m, "../secret.bin"))),
         InvalidModel, "'../secret.bin', outside the model's folder"),
    Case("external_absolute_path", _external(lambda m, f: _all_locations(m, str(_secret(f.parent)))),
         InvalidModel, "outside the model's folder"),
    Case("external_etc_passwd", _external(lambda m, f: _all_locations(m, "/etc/passwd")),
         InvalidModel, "'/etc/passwd', outside the model's folder"),
    Case("external_nested_traversal", _external(lambda m, f: _all_locations(m, "sub/../../secret.bin")),
         InvalidModel, "outside the model's folder"),
    Case("external_windows_drive", _external(lambda m, f: _all_locations(m, "C:\\weights.data")),
         InvalidModel, "outside the model's folder"),
    Case("external_url", _external(lambda m, f: _all_locations(m, "file:///etc/passwd")),
         InvalidModel, "outside the model's folder"),
    Case("external_symlinked_file", _external(_symlinked_file), InvalidModel, "resolves outside.*symbolic link"),
    Case("external_symlinked_dir", _external(_symlinked_dir), InvalidModel, "resolves outside.*symbolic link"),
    Case("external_file_missing", _external(lambda m, f: (f / "weights.data").unlink()),
         InvalidModel, "'weights.data', which is missing"),
    Case("external_file_truncated", _external(_truncate_data), InvalidModel, "'weights.data' is truncated"),
    Case("external_length_mismatch", _external(lambda m, f: _ext_entry(m, "w", "length", "12")),
         InvalidModel, "'w' declares 12 bytes.*needs 432"),
    Case("external_offset_past_end", _external(lambda m, f: _ext_entry(m, "b", "offset", "99999999")),
         InvalidModel, "truncated"),
    Case("external_negative_offset", _external(lambda m, f: _ext_entry(m, "b", "offset", "-16")),
         InvalidModel, "negative external data offset"),
    Case("external_bad_offset", _external(lambda m, f: _ext_entry(m, "b", "offset", "12abc")),
         InvalidModel, "non-integer external data offset"),
    Case("external_overlapping_regions", _external(_overlap), InvalidModel, "share bytes"),
    Case("external_location_is_directory", _external(lambda m, f: ((f / "d").mkdir(), _all_locations(m, "d"))),
         InvalidModel, "'d', which is not a file"),
    Case("external_empty_location", _external(lambda m, f: _all_locations(m, "")),
         InvalidModel, "empty or invalid external data location"),
    Case("external_data_without_folder", lambda t: _external()(t).read_bytes(),
         InvalidModel, "external file, but the model was given as bytes"),
]


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_model_is_refused(case, tmp_path, capsys):
    source = case.make(tmp_path)
    out = tmp_path / "out" / "model.dc.onnx"
    with pytest.raises(case.error, match=case.match) as info:
        dconnx.convert(source, out, methods="splitgrad")
    assert len(str(info.value)) < 2000                 # one clear paragraph, not a dump
    assert not out.exists() and not out.parent.exists()
    if isinstance(source, Path):
        assert main(["convert", str(source), "-o", str(out), "--methods", "splitgrad"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dconnx: error:") and "Traceback" not in err
        assert not out.exists() and not out.parent.exists()


def test_external_data_inside_folder_is_read(tmp_path):
    """The control for the external data cases: the untouched layout converts."""
    path = _external()(tmp_path)
    converted = dconnx.convert(path, tmp_path / "out.onnx", methods="splitgrad").model
    assert [o.name for o in converted.graph.output][:3] == ["logits", "g", "h"]


def test_every_truncation_is_refused(tmp_path):
    """A file cut anywhere (at a field boundary too, where protobuf parses without complaint)."""
    data = base_model().SerializeToString()
    cuts = sorted(set(range(0, len(data), 97)) | {len(data) - k for k in range(1, 40)})
    for cut in cuts:
        with pytest.raises(dconnx.InvalidModelError):
            dconnx.convert(data[:cut])


_VALID = base_model().SerializeToString()


# CI: 150 fixed examples; `make fuzz` sets DCONNX_FUZZ_EXAMPLES and a seed
_FUZZ = os.environ.get("DCONNX_FUZZ_EXAMPLES")


@settings(max_examples=int(_FUZZ or 150), deadline=None, derandomize=_FUZZ is None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_bytes_convert_or_raise_dconnx_error(edits):
    """Random byte corruption: a converted model or a DconnxError, never another exception."""
    data = bytearray(_VALID)
    for pos, val in edits:
        data[pos] = val
    try:
        dconnx.convert(bytes(data), methods="splitgrad")
    except dconnx.DconnxError as e:
        assert str(e)
