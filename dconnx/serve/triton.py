"""`dconnx export-triton`: a Triton Inference Server model repository for a converted model.

    REPO/NAME/config.pbtxt      inputs, outputs, max_batch_size, dynamic_batching, instance_group
    REPO/NAME/1/model.onnx      the converted model (and its external data file, if any)

The config follows Triton's ModelConfig (model_config.proto) and the rules its ONNX Runtime
backend checks at load time: with max_batch_size > 0 the batch axis is left out of `dims`, and
optional inputs are refused, so the `target` and `alpha` inputs (initializers with defaults) are
left out and every request explains the argmax class with the converted alpha. With
max_batch_size 0 (no batching) they are declared `optional: true`.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import InvalidModelError, OptionError

TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class TensorSpec:
    name: str
    data_type: str
    dims: list[int]                    # as written in config.pbtxt
    reshape: list[int] | None = None   # `reshape: { shape: [...] }` (a scalar under batching)
    optional: bool = False


@dataclass
class TritonExport:
    repo: Path
    name: str
    config_path: Path
    model_path: Path
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    notes: list[str] = field(default_factory=list)
    text: str = ""


def _dims(value_info) -> list[int]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        raise OptionError(f"'{value_info.name}' has no declared shape; Triton needs one")
    return [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]


def _spec(value_info, batching: bool, optional: bool = False) -> TensorSpec:
    elem = value_info.type.tensor_type.elem_type
    if elem not in TRITON_DTYPES:
        raise OptionError(f"'{value_info.name}' has ONNX element type {onnx.TensorProto.DataType.Name(elem)}, "
                          "which Triton does not take")
    dims = _dims(value_info)
    if batching:
        if not dims or dims[0] != -1:
            raise OptionError(f"'{value_info.name}' has shape {dims} without a dynamic batch axis; "
                              "export with --max-batch-size 0")
        dims = dims[1:]
    reshape = None
    if not dims:                       # a scalar: Triton wants dims [1] (plus an empty reshape when batching)
        dims, reshape = [1], ([] if batching else None)
    return TensorSpec(value_info.name, TRITON_DTYPES[elem], dims, reshape, optional)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor_block(t: TensorSpec) -> str:
    lines = [f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}",
             f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
    if t.reshape is not None:
        lines.append(f"    reshape: {{ shape: [ {', '.join(str(d) for d in t.reshape)} ] }}")
    if t.optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(name: str, max_batch_size: int, inputs, outputs, *, max_queue_delay_us: int,
                preferred_batch_sizes, instances: int, instance_kind: str, header: str = "") -> str:
    parts = [header, f"name: {_quote(name)}", 'backend: "onnxruntime"',
             'default_model_filename: "model.onnx"', f"max_batch_size: {int(max_batch_size)}",
             "input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(t) for t in outputs) + "\n]"]
    if max_batch_size > 0:
        db = []
        if preferred_batch_sizes:
            db.append(f"  preferred_batch_size: [ {', '.join(str(int(b)) for b in preferred_batch_sizes)} ]")
        db.append(f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}")
        parts.append("dynamic_batching {\n" + "\n".join(db) + "\n}")
    parts.append(f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: {INSTANCE_KINDS[instance_kind]}\n"
                 "  }\n]")
    return "\n".join(p for p in parts if p) + "\n"


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def export_triton(model, repo, name: str | None = None, *, version: int = 1, max_batch_size: int = 8,
                  max_queue_delay_us: int = 2000, preferred_batch_sizes=None, instances: int = 1,
                  instance_kind: str = "auto", overwrite: bool = False) -> TritonExport:
    """Write a Triton model repository entry for a converted model; returns what was written."""
    src = Path(model)
    if not src.is_file():
        raise InvalidModelError(f"no converted model at '{src}'")
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception as e:
        raise InvalidModelError(f"cannot read '{src}': {e}") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "dconnx.input" not in meta:
        raise InvalidModelError(f"'{src}' was not produced by `dconnx convert` (no dconnx metadata)")
    name = name or src.name.removesuffix(".onnx").removesuffix(".dc")
    if not NAME_RE.match(name):
        raise OptionError(f"model name '{name}' must use only letters, digits, '_', '.', '-'")
    if int(max_batch_size) < 0 or int(version) < 1 or int(instances) < 1:
        raise OptionError("max_batch_size must be >= 0, version and instances >= 1")
    if instance_kind not in INSTANCE_KINDS:
        raise OptionError(f"instance kind '{instance_kind}' is not one of {', '.join(INSTANCE_KINDS)}")
    if preferred_batch_sizes and any(not 1 <= int(b) <= max_batch_size for b in preferred_batch_sizes):
        raise OptionError(f"preferred batch sizes {list(preferred_batch_sizes)} must lie in 1..{max_batch_size}")

    batching = int(max_batch_size) > 0
    initializers = {t.name for t in proto.graph.initializer}
    inputs, notes = [], []
    for vi in proto.graph.input:
        if vi.name not in initializers:
            inputs.append(_spec(vi, batching))
        elif batching:
            notes.append(f"input '{vi.name}' left out: Triton's ONNX Runtime backend refuses optional inputs "
                         "when max_batch_size > 0, so its default is used (--max-batch-size 0 exposes it)")
        else:
            inputs.append(_spec(vi, batching, optional=True))
    outputs = [_spec(vi, batching) for vi in proto.graph.output]

    repo = Path(repo)
    entry = repo / name
    config_path = entry / "config.pbtxt"
    if config_path.exists() and not overwrite:
        raise OptionError(f"'{config_path}' exists; pass --force to replace it")
    vdir = entry / str(int(version))
    vdir.mkdir(parents=True, exist_ok=True)
    model_path = vdir / "model.onnx"
    shutil.copyfile(src, model_path)
    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    for loc in sorted(locations):        # external data keeps its relative file name
        shutil.copyfile(src.parent / loc, vdir / loc)

    header = (f"# Triton Inference Server model configuration, written by dconnx {meta.get('dconnx.version', '')}"
              f" from {src.name}\n# methods: {', '.join(_methods(meta)) or 'none'}")
    text = config_text(name, int(max_batch_size), inputs, outputs, max_queue_delay_us=max_queue_delay_us,
                       preferred_batch_sizes=preferred_batch_sizes, instances=instances,
                       instance_kind=instance_kind, header=header)
    _write_text(config_path, text)
    return TritonExport(repo, name, config_path, model_path, int(max_batch_size), inputs, outputs, notes, text)


def _methods(meta: dict) -> list[str]:
    import json
    try:
        return [h["output"] for h in json.loads(meta.get("dconnx.methods", "[]"))]
    except (ValueError, KeyError, TypeError):
        return []
