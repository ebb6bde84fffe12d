"""Checks of an untrusted model file, run by `dconnx.io.load_model` before anything uses it.

Each check raises InvalidModelError naming the tensor, node or file at fault; nothing is
read from an external data file before its path and size have been checked. The list of
refusals, with the reason for each, is in docs/reliability.md.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx

from .errors import InvalidModelError
from .ops import CONST_OPERAND_OPS
from .ops.resample import FIXED_FLOAT32_OPERANDS

# A declaration must not make us allocate without bound.
MAX_ELEMENTS = 2**31 - 1          # per tensor (runtimes index with int32)
MAX_PROTOBUF_BYTES = 2**31 - 1    # protobuf's own limit; bigger weights belong in external data
FLOAT_ELEM_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                    onnx.TensorProto.BFLOAT16)
# operands through which a non-finite constant poisons every output
WEIGHT_OPS = CONST_OPERAND_OPS   # declared in each op's OpSpec (const_operands)
# which repeated field holds the values when a tensor has no raw_data
_T = onnx.TensorProto
_TYPED_FIELD = {_T.FLOAT: "float_data", _T.DOUBLE: "double_data", _T.INT64: "int64_data",
                _T.UINT32: "uint64_data", _T.UINT64: "uint64_data", _T.STRING: "string_data",
                **{t: "int32_data" for t in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL,
                                             _T.FLOAT16, _T.BFLOAT16)}}
# what a file that is not an ONNX model usually is, by its first bytes
_MAGIC = [(b"PK\x03\x04", "a ZIP archive (a PyTorch .pt/.pth checkpoint or a zipped model?)"),
          (b"\x89HDF", "an HDF5 file (a Keras .h5 model?)"),
          (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
          (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"\x93NUMPY", "a NumPy array"), (b"\x80\x02", "a Python pickle"),
          (b"\x80\x04", "a Python pickle"), (b"\x80\x05", "a Python pickle")]


def sniff(data: bytes) -> str | None:
    """What a non-ONNX file looks like, from its first bytes (None: no idea)."""
    if data[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    head = data[:64].lstrip()
    if head[:1] in (b"{", b"[", b"<") or (head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)):
        return "text (JSON, XML or plain text)"
    return None


def all_tensors(model: onnx.ModelProto):
    """Initializers and tensor attributes (Constant values), subgraphs included."""
    return onnx.external_data_helper._get_all_tensors(model)


def _itemsize(data_type: int) -> int | None:
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except Exception:
        return None


def _tensor_label(t: onnx.TensorProto) -> str:
    return f"tensor '{t.name}'" if t.name else "an unnamed constant tensor"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"


def check_tensor(t: onnx.TensorProto) -> None:
    """Element type, dims and inline data length of one tensor (initializer or constant)."""
    label = _tensor_label(t)
    if t.data_type == _T.UNDEFINED or t.data_type not in _T.DataType.values():
        raise InvalidModelError(f"{label} has an unknown element type ({t.data_type})")
    if any(d < 0 for d in t.dims):
        raise InvalidModelError(f"{label} has a negative dimension {list(t.dims)}")
    n = math.prod(t.dims)
    if n > MAX_ELEMENTS:
        raise InvalidModelError(f"{label} declares {n} elements {list(t.dims)}, more than the "
                                f"{MAX_ELEMENTS} dconnx accepts in one tensor")
    if t.data_location == _T.EXTERNAL:
        return
    size = _itemsize(t.data_type)
    if t.HasField("raw_data"):
        if size is not None and t.data_type != _T.STRING and len(t.raw_data) != n * size:
            raise InvalidModelError(f"{label} holds {len(t.raw_data)} bytes; its shape {list(t.dims)} "
                                    f"needs {n * size}")
        return
    field = _TYPED_FIELD.get(t.data_type)
    if field is not None and len(getattr(t, field)) != n:
        raise InvalidModelError(f"{label} holds {len(getattr(t, field))} values; its shape "
                                f"{list(t.dims)} needs {n}")


def check_header(model: onnx.ModelProto, where: str, max_ir: int, max_opset: int) -> None:
    """IR version, opsets, and a graph with a data input and an output."""
    if not model.ir_version:
        raise InvalidModelError(f"'{where}' declares no IR version (not an ONNX model, or a damaged one)")
    if model.ir_version > max_ir:
        raise InvalidModelError(f"'{where}' has IR version {model.ir_version}; the newest that dconnx "
                                f"and its onnxruntime accept is {max_ir}")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InvalidModelError(f"'{where}' imports no version of the default ONNX opset")
    if default[0] > max_opset:
        raise InvalidModelError(f"'{where}' uses opset {default[0]}; the newest that dconnx and its "
                                f"onnxruntime accept is {max_opset}")
    g = model.graph
    inits = {t.name for t in g.initializer}
    if not [i for i in g.input if i.name not in inits]:
        raise InvalidModelError(f"'{where}' has no data input")
    if not g.output:
        raise InvalidModelError(f"'{where}' has no outputs")


_RULES = "the graph breaks the ONNX checker's rules: "


def _check_text(model: onnx.ModelProto) -> None:
    """Names are text: protobuf hands invalid UTF-8 in a string field back as bytes."""
    g = model.graph
    named = [("graph input", i.name) for i in g.input] + [("graph output", o.name) for o in g.output]
    named += [("value_info", v.name) for v in g.value_info] + [("initializer", t.name) for t in g.initializer]
    for k, node in enumerate(g.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output,
                  *(a.name for a in node.attribute)]
        named += [(f"node #{k}", f) for f in fields]
    named += [("opset import", o.domain) for o in model.opset_import]
    for where, text in named:
        if not isinstance(text, str):
            raise InvalidModelError(f"a name in {where} is not valid UTF-8 text ({bytes(text)[:40]!r})")


def check_structure(model: onnx.ModelProto) -> None:
    """Unique node names, single assignment, no dangling inputs or missing initializers, no
    cycles, topological order: messages that say which, before the checker's own."""
    g = model.graph
    _check_text(model)
    defined = {i.name: "a graph input" for i in g.input}
    for t in g.initializer:
        defined.setdefault(t.name, "an initializer")
    for t in g.sparse_initializer:
        defined.setdefault(t.values.name, "an initializer")
    names: dict[str, int] = {}
    producer: dict[str, int] = {}
    for k, node in enumerate(g.node):
        if node.name:
            if node.name in names:
                first = g.node[names[node.name]]
                raise InvalidModelError(f"node name '{node.name}' is used twice ({first.op_type} and "
                                        f"{node.op_type}); dconnx needs unique names to report problems")
            names[node.name] = k
        for o in node.output:
            if not o:
                continue
            if o in producer:
                raise InvalidModelError(f"{_RULES}tensor '{o}' is written by two nodes, "
                                        f"{_node_label(g.node[producer[o]], producer[o])} and "
                                        f"{_node_label(node, k)}")
            if o in defined:
                raise InvalidModelError(f"{_RULES}{_node_label(node, k)} overwrites '{o}', which is "
                                        f"{defined[o]}")
            producer[o] = k
    for k, node in enumerate(g.node):
        for j, i in enumerate(node.input):
            if i and i not in producer and i not in defined:
                what = "a missing initializer" if j > 0 and node.op_type in WEIGHT_OPS else "a dangling input"
                raise InvalidModelError(f"{_RULES}{_node_label(node, k)} reads '{i}', which no node, graph input "
                                        f"or initializer provides ({what})")
    for o in g.output:
        if o.name not in producer and o.name not in defined:
            raise InvalidModelError(f"{_RULES}graph output '{o.name}' is not produced by any node")
    # Kahn's algorithm: the nodes it cannot order lie on or behind a cycle
    deps = [{producer[i] for i in node.input if i in producer} for node in g.node]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    while ready:
        for u in users.get(ready.pop(), ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    stuck = [_node_label(g.node[k], k) for k, w in enumerate(waiting) if w > 0]
    if stuck:
        more = f" and {len(stuck) - 5} more" if len(stuck) > 5 else ""
        raise InvalidModelError(f"{_RULES}the graph has a cycle: {', '.join(stuck[:5])}{more} wait on "
                                "each other")
    for k, d in enumerate(deps):
        late = sorted(p for p in d if p > k)
        if late:
            raise InvalidModelError(f"{_RULES}nodes are not in topological order: {_node_label(g.node[k], k)} "
                                    f"comes before {_node_label(g.node[late[0]], late[0])}, which "
                                    "produces its input")


def check_inputs(model: onnx.ModelProto) -> None:
    """Data inputs are float tensors with a declared shape (before the checker's type errors)."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        if not i.type.HasField("tensor_type"):
            raise InvalidModelError(f"input '{i.name}' is not a tensor")
        et = i.type.tensor_type.elem_type
        if et not in FLOAT_ELEM_TYPES:
            name = _T.DataType.Name(et) if et in _T.DataType.values() else str(et)
            raise InvalidModelError(f"input '{i.name}' has element type {name}; dconnx explains float "
                                    "inputs only")
        if not i.type.tensor_type.HasField("shape"):
            raise InvalidModelError(f"input '{i.name}' declares no shape")
        _check_dims(i.name, _dims(i))


def check_weight_shapes(model: onnx.ModelProto) -> None:
    """What ONNX shape inference leaves unchecked: auto_pad values, a Conv's kernel_shape and
    input channels against its weight and groups, and its bias length."""
    g = model.graph
    shapes = {vi.name: _dims(vi) for vi in list(g.input) + list(g.value_info)
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    for k, node in enumerate(g.node):
        pad = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
        if pad not in (b"NOTSET", b"SAME_UPPER", b"SAME_LOWER", b"VALID"):
            raise InvalidModelError(f"{_node_label(node, k)}: auto_pad {pad.decode(errors='replace')!r} is "
                                    "not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if w is None or len(w) < 3:
            continue
        label = _node_label(node, k)
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
        if kernel is not None and kernel != w[2:]:
            raise InvalidModelError(f"{label}: kernel_shape {kernel} differs from the weight's {w[2:]}")
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group < 1 or w[0] % group:
            raise InvalidModelError(f"{label}: {w[0]} output channels cannot form {group} groups")
        if x is not None and len(x) > 1 and isinstance(x[1], int) and x[1] != w[1] * group:
            raise InvalidModelError(f"{label}: the input has {x[1]} channels; the weight {w} with "
                                    f"group={group} needs {w[1] * group}")
        b = shapes.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is not None and b != [w[0]]:
            raise InvalidModelError(f"{label}: bias shape {b}; the weight {w} needs [{w[0]}]")


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim]


def check_declared_shapes(model: onnx.ModelProto) -> None:
    """No zero-size and no huge float tensors (inputs, outputs, every inferred shape)."""
    g = model.graph
    placeholders = _empty_operand_placeholders(g)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type not in FLOAT_ELEM_TYPES or not tt.HasField("shape"):
            continue
        _check_dims(vi.name, _dims(vi), zero_ok=vi.name in placeholders)


def _empty_operand_placeholders(g: onnx.GraphProto) -> set[str]:
    """Tensors read only as Resize's roi or scales: Resize 11-12 has no optional inputs, so the
    TorchScript exporter writes an empty constant where a later opset leaves them out."""
    uses: dict[str, list[bool]] = {}
    for node in g.node:
        fixed = FIXED_FLOAT32_OPERANDS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append(i in fixed)
    outputs = {o.name for o in g.output}
    return {name for name, at in uses.items() if all(at) and name not in outputs}


def _check_dims(name: str, dims: list, zero_ok: bool = False) -> None:
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise InvalidModelError(f"tensor '{name}' has a negative dimension {dims} (a kernel larger than "
                                "its padded input?)")
    if any(d == 0 for d in dims) and not zero_ok:
        raise InvalidModelError(f"tensor '{name}' has a zero-size dimension {dims}: there is nothing "
                                "to explain")
    n = math.prod(d for d in dims if isinstance(d, int))
    if n > MAX_ELEMENTS:
        raise InvalidModelError(f"tensor '{name}' has shape {dims}: {n} elements (per batch), more than "
                                f"the {MAX_ELEMENTS} dconnx accepts in one tensor")


def check_values(model: onnx.ModelProto) -> None:
    """No NaN in any float constant or attribute; no ±Inf in weights, biases, constant operands
    and attributes (an infinite Clip bound is fine)."""
    from onnx import numpy_helper
    weights = {i for node in model.graph.node if node.op_type in WEIGHT_OPS for i in node.input}
    for t in all_tensors(model):
        if t.data_type not in FLOAT_ELEM_TYPES:
            continue
        a = numpy_helper.to_array(t)
        if np.isnan(a).any():
            raise InvalidModelError(f"{_tensor_label(t)} contains NaN; every output would be NaN")
        if t.name in weights and np.isinf(a).any():
            raise InvalidModelError(f"{_tensor_label(t)} contains ±Inf and is a weight or constant "
                                    "operand; the outputs would be Inf or NaN")
    for k, node in enumerate(model.graph.node):
        for attr in node.attribute:
            vals = [attr.f] if attr.type == onnx.AttributeProto.FLOAT else list(attr.floats)
            if any(math.isnan(v) for v in vals):
                raise InvalidModelError(f"attribute '{attr.name}' of {_node_label(node, k)} is NaN")
            if attr.name not in ("min", "max") and any(math.isinf(v) for v in vals):
                raise InvalidModelError(f"attribute '{attr.name}' of {_node_label(node, k)} is ±Inf")


def check_external_data(model: onnx.ModelProto, base_dir: Path | None, where: str) -> bool:
    """Refuse external data outside the model's folder (path traversal, absolute paths,
    symbolic links), missing or truncated data files and overlapping regions, before a
    byte is read. Returns whether the model has external data."""
    tensors = [t for t in all_tensors(model) if t.data_location == _T.EXTERNAL]
    if not tensors:
        return False
    if base_dir is None:
        raise InvalidModelError(
            f"{_tensor_label(tensors[0])} stores its data in an external file, but the model was given "
            f"as {where}: pass the model's path so that its folder is known")
    base = base_dir.resolve()
    regions: dict[Path, list] = {}
    for t in tensors:
        label = _tensor_label(t)
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or "\0" in loc:
            raise InvalidModelError(f"{label} has an empty or invalid external data location {loc!r}")
        parts = loc.replace("\\", "/").split("/")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or loc[1:2] == ":" or ".." in parts \
                or "://" in loc:
            raise InvalidModelError(f"{label} stores its data at '{loc}', outside the model's folder; "
                                    "refusing to read it")
        target = (base / loc).resolve()
        if not target.is_relative_to(base):
            raise InvalidModelError(f"{label} stores its data at '{loc}', which resolves outside the "
                                    "model's folder (a symbolic link); refusing to read it")
        if not target.exists():
            raise InvalidModelError(f"{label} needs the external data file '{loc}', which is missing")
        if not target.is_file():
            raise InvalidModelError(f"{label} needs the external data file '{loc}', which is not a file")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise InvalidModelError(f"{label} has a non-integer external data offset or length") from None
        if offset < 0 or (length is not None and length < 0):
            raise InvalidModelError(f"{label} has a negative external data offset or length")
        size = _itemsize(t.data_type)
        need = math.prod(t.dims) * size if size is not None and t.data_type != _T.STRING else length
        if length is not None and need is not None and length != need:
            raise InvalidModelError(f"{label} declares {length} bytes of external data; its shape "
                                    f"{list(t.dims)} needs {need}")
        have = target.stat().st_size
        if need is not None and offset + need > have:
            raise InvalidModelError(f"the external data file '{loc}' is truncated: {label} needs bytes "
                                    f"{offset} to {offset + need}, the file has {have}")
        regions.setdefault(target, []).append((offset, offset + (need or 0), t.name))
    for path, spans in regions.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise InvalidModelError(f"tensors '{a}' and '{b}' share bytes of the external data "
                                        f"file '{path.name}'; refusing overlapping regions")
    return True
