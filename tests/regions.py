"""Float32 results checked against float64 without crossing ReLU kinks or max-pool near-ties.

A ReLU CNN is piecewise linear: its gradient is constant within one activation pattern (the
ReLU masks and the max-pool winners) and jumps between patterns. A float32 forward of a deep
random net puts some pre-activations on the other side of zero (and some max-pool windows on
another winner) than float64 does, and which ones depends on the CPU's kernels; a float32
map compared with any other computation (float32 torch, float64) then differs by whatever those
units carried, percent-sized on DenseNet121 — a tolerance that passes on one machine only.

`float32_and_same_region_float64` removes that: it runs the converted float32 graph in
onnxruntime, fetching every boolean and integer tensor it computes (masks, comparisons,
max-pool Indices, ArgMax), then evaluates the same graph in float64 (tests/onnx_torch.py) with
those tensors fed in place of their float64 values. Both computations lie in the same linear
piece, so they differ by float32 rounding alone, and RTOL32 holds on every machine. That the
graph's float64 semantics are right is checked separately against float64 autograd of the
original ONNX graph (`onnx_autograd`), where no kink is crossed either.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference

import onnx_torch
from dconnx.precision import cast_model
from dconnx.runtime import make_session

DISCRETE = (TensorProto.BOOL, TensorProto.INT64, TensorProto.INT32)


def discrete_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the boolean and integer tensors the graph computes (not its inputs)."""
    inferred = shape_inference.infer_shapes(model)
    inputs = {i.name for i in model.graph.input}
    return sorted({vi.name for vi in inferred.graph.value_info
                   if vi.type.tensor_type.elem_type in DISCRETE} - inputs)


def float32_and_same_region_float64(model: onnx.ModelProto, feeds: dict) -> tuple[dict, dict]:
    """(onnxruntime's float32 outputs, the float64 outputs of the same graph in onnxruntime's
    activation pattern); `feeds` in float32 (integer feeds as they are)."""
    names = discrete_tensors(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.ValueInfoProto(name=n) for n in names])
    # one run: without onnxruntime's buffer-reuse planning, which takes seconds to start on graphs
    # of 2000 to 3000 nodes (converted ShuffleNet: 3.4 s, 0.4 s without); the outputs are the
    # same bit for bit
    sess = make_session(probe, ["CPUExecutionProvider"], memory_reuse=False)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    wanted = [o.name for o in model.graph.output]
    del sess, probe             # the float64 evaluation below needs their memory

    m64 = cast_model(model, TensorProto.DOUBLE)
    del model
    fed = set(names)
    for node in m64.graph.node:      # the float64 graph computes them under other names, unused
        for i, out in enumerate(node.output):
            if out in fed:
                node.output[i] = f"{out}::float64"
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    feeds64.update({n: got[n] for n in names})
    ref = onnx_torch.run(m64, feeds64)
    return {k: got[k] for k in wanted}, {k: ref[k] for k in wanted}


def onnx_autograd(model: onnx.ModelProto, x: np.ndarray, target) -> np.ndarray:
    """d(the target logits' sum)/d(input) of an ONNX classifier, by torch autograd through the
    graph's own ops (tests/onnx_torch.py), in the graph's precision."""
    env = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in model.graph.initializer}
    xt = torch.tensor(x, requires_grad=True)
    env[model.graph.input[0].name] = xt
    for node in model.graph.node:
        outs = onnx_torch._eval(node, [env[i] if i else None for i in node.input],
                                onnx_torch._attrs(node), env)
        for name, value in zip(node.output, outs if isinstance(outs, (list, tuple)) else [outs]):
            if name:
                env[name] = value
    out = env[model.graph.output[0].name]
    out.reshape(out.shape[0], -1).gather(1, torch.as_tensor(target).long()[:, None]).sum().backward()
    return xt.grad.numpy()
