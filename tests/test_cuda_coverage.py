"""No node of a converted model falls back from CUDA to the CPU (static check, no GPU needed).

onnxruntime places a node on the CUDA execution provider only when that provider registers a
kernel for the node's (domain, op type), for the *since version* of the op's schema at the
model's opset, and for the element types bound to each of the kernel's type parameters; any
other node runs on the CPU provider, with copies to and from the device around it.
tests/data/cuda_kernels.json holds the CUDA provider's kernels from onnxruntime's own
docs/OperatorKernels.md (generated from its kernel registry; the source is named in the file,
tests/data/make_cuda_kernels.py regenerates it). `fallbacks` applies onnxruntime's matching rule
(KernelRegistry::VerifyKernelDef): a kernel [start, end] matches when start == since version,
or start < since version <= end with a closed end; each type parameter listed for the kernel
must hold the node's actual element types wherever the schema uses that parameter.

The converted models: the fixture CNN, ResNet18 (64x64) and a depthwise-separable net
(tests/zoo.py tiny_residual) from both exporters (opset 17 and 18), and VGG16Small at 32x32,
each with every method (the three heads and the baselines) in float32 and float16, and the
fixture with each conversion option that changes the graph. Constant nodes are skipped:
onnxruntime turns them into initializers when it loads the model.
"""
from __future__ import annotations

import json
import pathlib

import onnx
import pytest
import torch
from onnx import defs, helper, shape_inference

import dconnx
import zoo
from dconnx.methods import METHODS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = pathlib.Path(__file__).with_name("data") / "cuda_kernels.json"

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:.*at the input layer:UserWarning"),
]

# Op types whose nodes may run on the CPU provider, each with its reason. None in the zoo models.
# A model's own Celu (onnxruntime's CUDA provider has no Celu kernel) is rewritten into Elu
# (test_celu_leaves_no_fallback); Mish, SiLU and GELU export as supported ops.
ALLOWED: dict[str, str] = {}


def load_table(path=TABLE) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def _elem_types(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> element type name ("float", "int64", ...) for every tensor of the graph."""
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    # TensorProto.FLOAT -> "float", as OperatorKernels.md writes tensor(float)
    return {name: helper.tensor_dtype_to_string(t).removeprefix("TensorProto.").lower()
            for name, t in types.items()}


def _bindings(schema, node, types) -> dict[str, set[str]]:
    """Type parameter (or literal type string) -> element types of the node's arguments bound to it."""
    bound: dict[str, set[str]] = {}

    def bind(formals, actuals):
        for i, name in enumerate(actuals):
            if not name:
                continue
            if i < len(formals):
                formal = formals[i]
            elif formals and formals[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
                formal = formals[-1]
            else:
                continue
            if name not in types:
                raise AssertionError(f"{node.op_type} node '{node.name}': no element type known for '{name}'")
            bound.setdefault(formal.type_str, set()).add(types[name])

    bind(list(schema.inputs), list(node.input))
    bind(list(schema.outputs), list(node.output))
    return bound


def fallbacks(model: onnx.ModelProto, table: dict) -> list[tuple[str, str, int, str, str]]:
    """(node name, op type, since version, element types, reason) of every node that has no CUDA
    kernel in `table` (see the module docstring for the rule)."""
    types = _elem_types(model)
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    kernels = table["kernels"]
    out = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        domain = node.domain or "ai.onnx"
        schema = defs.get_schema(node.op_type, opsets[domain], "" if domain == "ai.onnx" else domain)
        since = schema.since_version
        bound = _bindings(schema, node, types)
        shown = ", ".join(f"{p}={'/'.join(sorted(t))}" for p, t in sorted(bound.items()))
        rows = kernels.get(domain, {}).get(node.op_type)
        if not rows:
            out.append((node.name, node.op_type, since, shown, "no CUDA kernel for the op"))
            continue
        versioned = [r for r in rows
                     if r[0] == since or (r[0] < since and r[1] is not None and r[1] >= since)]
        if not versioned:
            ranges = ", ".join(f"{r[0]}+" if r[1] is None else f"[{r[0]}, {r[1]}]" for r in rows)
            out.append((node.name, node.op_type, since, shown,
                        f"no CUDA kernel for since version {since} (kernels: {ranges})"))
            continue
        if not any(all(bound.get(p, set()) <= set(allowed) for p, allowed in r[2].items())
                   for r in versioned):
            out.append((node.name, node.op_type, since, shown, "no CUDA kernel for these types"))
    return out


def _unexpected(found):
    return [f for f in found if f[1] not in ALLOWED]


# ----------------------------------------------------------------------------------------------
# the converted models
# ----------------------------------------------------------------------------------------------
ALL_METHODS = ",".join(METHODS)
PRECISIONS = ("float32", "float16")
# each conversion option that changes the graph's ops, on the fixture
FIXTURE_OPTIONS = {
    "defaults": {},
    "cam-at-layer": {"layer": "3", "methods": "splitcam,gradcam,layercam,splitgrad"},
    "maxpool-dc": {"maxpool": "dc"},
    "linear-four": {"linear_form": "four"},
    "relu-sum": {"relu_backward": "sum"},
    "relu-mask-diff": {"relu_backward": "mask_diff"},
    "no-stabilize": {"stabilize": "none"},
    "frobenius": {"alpha_mode": "frobenius"},
    "keep-bn": {"fold_batchnorm": False},
    "no-share": {"share_forward": False},
    "ties-geq": {"ties": "geq"},
    "minmax": {"normalize": "minmax", "upsample": False},
}


@pytest.fixture(scope="session")
def table():
    return load_table()


def _convert(source, precision, **options):
    options.setdefault("methods", ALL_METHODS)
    return dconnx.convert(source, precision=precision, **options).model


def _check(model, table):
    found = fallbacks(model, table)
    assert not _unexpected(found), "nodes without a CUDA kernel:\n" + "\n".join(map(str, found))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("option", list(FIXTURE_OPTIONS))
def test_fixture_every_option_has_cuda_kernels(option, precision, table):
    _check(_convert(str(ROOT / "models" / "fixture_cnn.onnx"), precision, **FIXTURE_OPTIONS[option]), table)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("name", ["resnet18", "tiny_residual"])
def test_zoo_models_have_cuda_kernels(name, exporter, precision, zoo_model, table):
    _check(_convert(str(zoo_model(name, exporter)), precision), table)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_vgg16_small_has_cuda_kernels(precision, vgg16_small_onnx, table):
    _check(_convert(vgg16_small_onnx, precision), table)


# ----------------------------------------------------------------------------------------------
# the check itself
# ----------------------------------------------------------------------------------------------
def _one_node(op, inputs, outputs, opset, **attrs):
    """A one-node model: inputs/outputs as (name, TensorProto type, shape)."""
    node = helper.make_node(op, [i[0] for i in inputs], [o[0] for o in outputs], name=op, **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


F, H, B, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL, onnx.TensorProto.INT64


@pytest.mark.parametrize("model,reason", [
    # ConstantOfShape has one CUDA kernel, 9+: the schema of opset 20 (since 20) has none
    (_one_node("ConstantOfShape", [("s", I64, [2])], [("y", F, None)], 20), "since version 20"),
    # GlobalAveragePool 1+ only: opset 22's schema (since 22) has none
    (_one_node("GlobalAveragePool", [("x", F, [1, 2, 3, 3])], [("y", F, None)], 22), "since version 22"),
    (_one_node("Where", [("c", B, [2]), ("a", B, [2]), ("b", B, [2])], [("y", B, None)], 17), "types"),
    (_one_node("Range", [("a", H, []), ("b", H, []), ("d", H, [])], [("y", H, None)], 17), "types"),
    (_one_node("Unique", [("x", F, [3])], [("y", F, None)], 17), "no CUDA kernel for the op"),
])
def test_check_finds_a_node_without_cuda_kernel(model, reason, table):
    found = fallbacks(model, table)
    assert len(found) == 1 and reason in found[0][4], found


@pytest.mark.parametrize("model", [
    _one_node("ConstantOfShape", [("s", I64, [2])], [("y", H, None)], 17,
              value=helper.make_tensor("v", H, [1], [0.0])),
    _one_node("Where", [("c", B, [2]), ("a", H, [2]), ("b", H, [2])], [("y", H, None)], 18),
    _one_node("Conv", [("x", H, [1, 2, 5, 5]), ("w", H, [2, 2, 3, 3])], [("y", H, None)], 21),
])
def test_check_accepts_nodes_with_cuda_kernels(model, table):
    assert fallbacks(model, table) == []


def test_table_names_its_source_and_covers_the_emitted_ops(table):
    assert "OperatorKernels.md" in table["source"] and table["provider"] == "CUDAExecutionProvider"
    kernels = table["kernels"]["ai.onnx"]
    for op in ("Conv", "ConvTranspose", "Gemm", "MaxPool", "ScatterElements", "Relu", "Where"):
        assert kernels[op], op


def test_celu_leaves_no_fallback(table):
    """A Celu activation (onnxruntime has no CUDA Celu kernel, and Celu has no float16 type) is
    rewritten exactly into α·Elu(x/α): every node of the converted graph has a CUDA kernel, in
    float32 and float16."""
    from helpers import export
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.CELU(0.5),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 5))
    model = export(net, torch.randn(1, 3, 8, 8))
    assert "Celu" in {n.op_type for n in model.graph.node}
    for precision in PRECISIONS:
        converted = _convert(model, precision, methods="splitgrad,gradient")
        assert "Celu" not in {n.op_type for n in converted.graph.node}
        assert fallbacks(converted, table) == [], precision
