"""Loading, validating and atomically saving models.

A model file is untrusted input: `load_model` runs the checks of dconnx/model_checks.py
before anything uses it, and every refusal is an InvalidModelError naming the problem.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import shape_inference

from . import model_checks as checks
from .errors import InvalidModelError, OutputError

# What the pinned onnxruntime accepts, and what the generated nodes need
# (ScatterElements with reduction="add" and Split with a sizes input).
MAX_IR_VERSION = 13
MAX_OPSET = 26
MIN_OPSET = 17

ModelLike = "str | os.PathLike | onnx.ModelProto | bytes"

# Conversion is linear in the node count but not cheap: measured on Relu chains of 2,000 and
# 8,000 nodes, 15-20 KB of peak memory and about 0.4 ms per node (1.4 ms on a loaded machine),
# most of it in the passes' graph refreshes (each rebuilds the Graph index and reruns onnx
# shape inference, ~20 times per conversion). Larger graphs are refused before that work
# starts; real CNNs have a few hundred to a few thousand nodes. DCONNX_MAX_NODES overrides it.
MAX_NODES = 20_000
STALE_TEMP_S = 3600.0      # an old-style temporary with no owner id is stale after this long


def max_nodes() -> int:
    try:
        return int(os.environ.get("DCONNX_MAX_NODES", MAX_NODES))
    except ValueError:
        return MAX_NODES


def check_node_count(model: onnx.ModelProto, where: str) -> None:
    """InvalidModelError when the graph (with its subgraphs) has more nodes than max_nodes()."""
    limit = max_nodes()
    count, stack = 0, [model.graph]
    while stack:
        g = stack.pop()
        count += len(g.node)
        if count > limit:
            raise InvalidModelError(f"{where} has more than {limit} nodes; dconnx converts graphs of at most "
                                    f"{limit} nodes (about 20 KB of memory each; set DCONNX_MAX_NODES to raise it)")
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)


def load_model(source, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto, with external data, and validate it.

    Raises InvalidModelError naming the reason when the file is not a valid model. The
    header, every tensor's declared size and the external data's paths and sizes are
    checked before any weight is read; with `check`, so are the graph's structure, the
    checker and strict shape inference, the declared shapes and the constants' values.
    """
    model, base_dir, where = _read(source)
    if where == "a ModelProto":     # the caller's model stays untouched
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    checks.check_header(model, "<bytes>" if where == "bytes" else where, MAX_IR_VERSION, MAX_OPSET)
    refuse_converted(model, where)
    check_node_count(model, where)
    for t in checks.all_tensors(model):
        checks.check_tensor(t)
    if checks.check_external_data(model, base_dir, where):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
        except Exception as e:  # unreadable data files
            raise InvalidModelError(f"cannot read the external data of '{source}': {e}") from e
    if check:
        checks.check_structure(model)
        checks.check_inputs(model)
        validate(model)     # also infers shapes into the model
        checks.check_declared_shapes(model)
        checks.check_weight_shapes(model)
        checks.check_values(model)
    return model


def model_source(source):
    """What `convert` returned (a ConvertedModel: a ModelProto `.model` with its `.report`) as
    its ModelProto; anything else unchanged. (Recognized by its fields: io does not import api,
    which imports io.)"""
    inner = getattr(source, "model", None)
    if isinstance(inner, onnx.ModelProto) and hasattr(source, "report"):
        return inner
    return source


def _read(source) -> tuple[onnx.ModelProto, Path | None, str]:
    """(model without external data, folder of its external data, how to name it in errors).
    A ModelProto is returned itself, not copied."""
    source = model_source(source)
    if isinstance(source, onnx.ModelProto):
        return source, None, "a ModelProto"
    if isinstance(source, (bytes, bytearray)):
        return _parse(bytes(source), "<bytes>"), None, "bytes"
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidModelError(f"expected a model file path, bytes or an onnx.ModelProto, "
                                f"got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise InvalidModelError(f"no model file at '{path}': it is a folder")
    if not path.is_file():
        raise InvalidModelError(f"no model file at '{path}'")
    try:
        if path.stat().st_size > checks.MAX_PROTOBUF_BYTES:
            raise InvalidModelError(f"'{path}' is larger than protobuf's 2 GiB limit, so it cannot be an "
                                    "ONNX model file (big weights belong in external data)")
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"cannot read '{path}': {e.strerror or e}") from e
    return _parse(data, str(path)), path.parent, str(path)


def load_header(source) -> onnx.ModelProto:
    """A model's graph and metadata without its external data (path, bytes, ModelProto or
    ConvertedModel), for reading a converted model's metadata. Not validated; InvalidModelError
    when the source is not an ONNX model at all."""
    return _read(source)[0]


def is_converted(model: onnx.ModelProto) -> bool:
    """The model is an output of `dconnx convert`: its metadata, or the generated `dc/` nodes
    and g, h outputs when the metadata was stripped."""
    if any(p.key == "dconnx.input" for p in model.metadata_props):
        return True
    outputs = {o.name for o in model.graph.output}
    return {"g", "h"} <= outputs and any(n.name.startswith("dc/") for n in model.graph.node)


def refuse_converted(model: onnx.ModelProto, where: str) -> None:
    """InvalidModelError for a model that dconnx already converted (its generated nodes would
    otherwise be reported as unsupported ops)."""
    if is_converted(model):
        name = f"'{where}'" if where not in ("a ModelProto", "bytes") else "this model"
        raise InvalidModelError(f"{name} was already converted by dconnx (it is an output of `dconnx "
                                "convert`); convert the original model instead")


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"'{where}' is empty")
    what = checks.sniff(data)
    if what is not None:
        raise InvalidModelError(f"'{where}' is not an ONNX model: it looks like {what}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:
        raise InvalidModelError(f"'{where}' is not an ONNX model, or a truncated one (protobuf parse "
                                f"failed: {e})") from e
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
        n = math.prod(t.dims)
        if n <= limit:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    """Big initializers skipped by the light check: their data must match their dims."""
    for t in model.graph.initializer:
        checks.check_tensor(t)


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


def current_umask() -> int:
    """The process's umask. Read from /proc where there is one; elsewhere os.umask has to set
    it to read it, which is not thread-safe (another thread creating a file in between gets
    mode 0o666 & ~0o022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def check_output(path) -> Path:
    """`path` as a Path; OutputError when a folder is in its place (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': it is a folder; give a file name")
    return path


def prepare_output(path) -> Path:
    """`path` as a Path whose folder exists; OutputError when a folder is in the way or the
    folder cannot be made (before anything is written)."""
    path = check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': cannot make its folder '{path.parent}' "
                          f"({e.strerror or e})") from e
    return path


def _temp_prefix(path: Path) -> str:
    """Hidden temporaries beside `path` carry the writer's process id: `.NAME.PID.`."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporaries of `path` that a killed writer left behind: those whose process id
    names no running process, and old-style staging folders (no id, holding only the model and
    its .data) untouched for STALE_TEMP_S."""
    import re
    import time
    removed = []
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.)?[A-Za-z0-9_]{8}(?:\..*)?$")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or entry.is_symlink():
            continue
        if m.group(1) is not None:
            pid = int(m.group(1))
            if pid == os.getpid() or _alive(pid):
                continue
        else:           # only a staging folder of save_model's (the model and its .data inside)
            try:
                if not entry.is_dir(follow_symlinks=False) or \
                        time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_S or \
                        not set(os.listdir(entry.path)) <= {path.name, path.name + ".data"}:
                    continue
            except OSError:
                continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def atomic_write(path, write, suffix: str = "") -> Path:
    """write(tmp_path) into a temporary file beside `path`, then rename: never a partial file.
    The file gets the mode a plain open() would give it (0o666 minus the umask).
    OutputError when the path cannot be written."""
    path = prepare_output(path)
    try:
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_model(model: onnx.ModelProto, path, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (temporary file, then rename).

    External data (`<name>.data` beside the file) is used when asked, or when the
    model would not fit in one protobuf.
    """
    path = prepare_output(path)
    model = model_source(model)
    size = model.ByteSize()
    if external_data is None:
        external_data = size > 1_800_000_000
    data_name = path.name + ".data"
    if external_data and (path.parent / data_name).is_dir():
        raise OutputError(f"cannot write '{path.parent / data_name}': it is a folder")
    try:
        remove_stale_temps(path)
        workdir = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
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
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path
