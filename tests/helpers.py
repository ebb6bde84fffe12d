"""Shared test helpers: exporting torch modules, running converted models."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnx_reference import run_reference

# this process's share of the cores (tests/conftest.py: cores // pytest-xdist workers)
THREADS = int(os.environ.get("DCONNX_THREADS") or 2)


def export(module: torch.nn.Module, x: torch.Tensor, *, exporter: str = "torchscript",
           keep_bn: bool = False, opset: int = 17) -> onnx.ModelProto:
    """Export to ONNX in memory with a dynamic batch axis (input 'input', output 'logits')."""
    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            kw = {}
            if keep_bn:
                kw = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
        else:
            torch.onnx.export(module, (x,), buf, dynamo=True, input_names=["input"],
                              output_names=["logits"],
                              dynamic_shapes={list(_forward_args(module))[0]: {0: torch.export.Dim("batch")}})
            release_exported_graph()
    return onnx.load_from_string(buf.getvalue())


def release_exported_graph() -> None:
    """onnxscript's rewrite rules are module-level objects whose matchers keep the last graph they
    matched, and through it every weight of the last dynamo export, until the next export: drop it
    (0.6 GB after a float64 FCN-ResNet50)."""
    import gc
    from onnxscript.rewriter._matcher import SimplePatternMatcher
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            obj._graph = None
            obj._init_match(0)


def _forward_args(module):
    import inspect
    return inspect.signature(module.forward).parameters


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    from dconnx.runtime import make_session
    return make_session(model, ["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, **extra) -> dict:
    """Run a converted model with onnxruntime (float32) or onnx.reference (float64)."""
    feeds = {"input": x}
    for k, v in extra.items():
        if v is not None:
            feeds[k] = np.asarray(v, dtype=np.int64 if k == "target" else x.dtype)
    if x.dtype == np.float64:
        return run_reference(model, feeds)
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def torch_grad(module, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Plain autograd gradient of the selected logits with respect to the input."""
    xt = torch.tensor(x, requires_grad=True)
    out = module(xt)
    out = out.reshape(out.shape[0], -1)
    out.gather(1, torch.as_tensor(target).long()[:, None]).sum().backward()
    return xt.grad.numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def with_ties(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random data with exact zeros and repeated values (ties in pooling windows)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, flat.size // 8, replace=False)] = 0.0
    idx = rng.choice(flat.size, flat.size // 8, replace=False)
    flat[idx] = flat[idx[0]]
    return x
