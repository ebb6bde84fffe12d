"""Loading, validating and atomically saving models."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from .errors import InvalidModelError

# What the pinned onnxruntime accepts, and what the generated nodes need
# (ScatterElements with reduction="add" and Split with a sizes input).
MAX_IR_VERSION = 13
MAX_OPSET = 26
MIN_OPSET = 17

ModelLike = "str | os.PathLike | onnx.ModelProto | bytes"


def _check_external_paths(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that points outside the model's folder."""
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if os.path.isabs(loc) or ".." in Path(loc).parts:
            raise InvalidModelError(
                f"initializer '{tensor.name}' stores its data at '{loc}', outside the model's "
                "folder; refusing to read it")
        target = (base / loc)
        if not target.resolve().is_relative_to(base):
            raise InvalidModelError(
                f"initializer '{tensor.name}' stores its data at '{loc}', which resolves outside "
                "the model's folder; refusing to read it")
        if not target.exists():
            raise InvalidModelError(
                f"initializer '{tensor.name}' needs the external data file '{loc}', which is missing")


def load_model(source, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto, with external data, and validate it.

    Raises InvalidModelError naming the reason when the file is not a valid model.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base_dir = None
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
        base_dir = None
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidModelError(f"no model file at '{path}'")
        model = _parse(path.read_bytes(), str(path))
        base_dir = path.parent
    if base_dir is not None:
        _check_external_paths(model, base_dir)
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
        except Exception as e:  # truncated or unreadable data files
            raise InvalidModelError(f"cannot read the external data of '{source}': {e}") from e
    if check:
        validate(model)     # also infers shapes into the model
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:
        raise InvalidModelError(f"'{where}' is not an ONNX model (protobuf parse failed: {e})") from e
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModelError(f"'{where}' is not an ONNX model (no graph or no nodes)")
    return model


def _light_copy(model: onnx.ModelProto, limit: int = 64) -> onnx.ModelProto:
    """The model's graph without the payload of big initializers: each becomes a typed
    graph input, which is all the checker and shape inference need of it."""
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    names = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n <= limit:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Big initializers skipped by the light check: their data must match their dims."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.raw_data:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != n * itemsize:
            raise InvalidModelError(f"initializer '{t.name}' holds {len(t.raw_data)} bytes; "
                                    f"its shape {list(t.dims)} needs {n * itemsize}")


def validate(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full checker and strict shape inference, on a weightless copy so big models stay fast.

    Returns `model` itself with freshly inferred value_info."""
    try:
        onnx.checker.check_model(_light_copy(model), full_check=True)
    except Exception as e:
        raise InvalidModelError(f"the model fails onnx.checker: {_first_line(e)}") from e
    _check_tensor_sizes(model)
    return infer_shapes(model)


def infer_shapes(model: onnx.ModelProto, strict: bool = True) -> onnx.ModelProto:
    """Fresh strict shape inference without copying big weights; replaces the model's
    value_info with the inferred one and returns the model."""
    light = _light_copy(model)
    del light.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(light, check_type=True, strict_mode=strict, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"the model fails strict shape inference: {_first_line(e)}") from e
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        if o.name in outs:
            o.CopyFrom(outs[o.name])
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def save_model(model: onnx.ModelProto, path, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (temporary file, then rename).

    External data (`<name>.data` beside the file) is used when asked, or when the
    model would not fit in one protobuf.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.ByteSize()
    if external_data is None:
        external_data = size > 1_800_000_000
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    data_name = path.name + ".data"
    try:
        staged = workdir / path.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            onnx.save_model(copy, str(staged))
            os.replace(workdir / data_name, path.parent / data_name)
        else:
            staged.write_bytes(model.SerializeToString())
        os.replace(staged, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path
