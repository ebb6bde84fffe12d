"""The float-resolution probe run by `convert`: g − h against the logits on a probe input.

Under recentering (the default) the streams are reset to (relu(x), relu(−x)) at every
recentering point and g − h resolves f. Without recentering (`stabilize="none"`) g and h are the
true convex parts, and streams grow layer by layer (squares through products): float32 may no
longer resolve their difference; float16 may not resolve it even with recentering. `convert` then runs the converted model once on a seeded standard-normal probe input
and compares g − h with the logits.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx

from .errors import NumericalError
from .runtime import NumericalWarning

# g − h may miss the logits by this fraction of their largest magnitude before the conversion
# is called unresolved (float32 rounding of well-resolved models is ~1e-6 of |g|)
RESOLVED = 1e-2


def needs_probe(opts, model: onnx.ModelProto) -> bool:
    """Without recentering, or in float16; not for float64 models (onnxruntime's CPU provider has
    no float64 convolutions, and float64 resolves what float32 does)."""
    elem = model.graph.input[0].type.tensor_type.elem_type if model.graph.input else 0
    return (opts.stabilize == "none" or opts.precision == "float16") and elem != onnx.TensorProto.DOUBLE


def probe(model: onnx.ModelProto, explained: str, seed: int = 0) -> tuple[float, float]:
    """(max |g − h − f| / max |f|, max |g|) on a probe input (batch 2, standard normal)."""
    from .runtime import make_session
    if explained not in {o.name for o in model.graph.output}:     # the logits under a Softmax
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.append(onnx.ValueInfoProto(name=explained))
    sess = make_session(model, ["CPUExecutionProvider"], threads=1)
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 2 for d in inp.shape]
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(float16)": np.float16}.get(inp.type, np.float32)
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {inp.name: x})))
    f, g, h = (out[k].astype(np.float64) for k in (explained, "g", "h"))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(g - h - f).max() / max(float(np.abs(f).max()), np.finfo(np.float32).tiny)
    return float(err) if np.isfinite(err) else float("inf"), float(np.abs(g).max())


def check_resolution(model: onnx.ModelProto, explained: str, opts, notes: list, stacklevel: int) -> None:
    """Probe, note the result, and warn (stabilize "none": the user asked for the true g and h)
    or refuse (NumericalError) when float cannot resolve g − h."""
    err, gmax = probe(model, explained)
    notes.append(f"probe: g - h misses the logits by {err:.2g} of their magnitude (|g| up to {gmax:.3g})")
    if err <= RESOLVED:
        return
    what = (f"g - h misses the logits by {err:.3g} of their magnitude on a probe input (|g| up to "
            f"{gmax:.3g}): {opts.precision} cannot resolve this model's g and h")
    if opts.stabilize == "none":
        warnings.warn(f"{what} without recentering; g and h, SplitCAM and SplitLRP (which read the "
                      "streams) are unreliable. --stabilize recenter (the default) resolves them",
                      NumericalWarning, stacklevel=stacklevel)
    else:
        raise NumericalError(f"{what}; convert with precision float32")
