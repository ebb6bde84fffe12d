"""`dconnx.quantus_explain_func`: a converted model as Quantus' `explain_func`.

Quantus calls `explain_func(model=..., inputs=x_batch, targets=y_batch, **explain_func_kwargs)`
and wants attributions shaped like the inputs, with channel 1 ([N, 1, H, W] for NCHW inputs).
The `model` Quantus passes (its torch/keras model, used for its perturbation metrics) is not run
here: the maps come from the converted ONNX model, in one onnxruntime session per adapter.
Neither quantus nor torch is imported.
"""
from __future__ import annotations

import numpy as np

from .errors import OptionError


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):            # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def quantus_explain_func(model_path, method: str | None = None, *, alpha: float | None = None,
                         batch_size: int = 64, providers=None, threads=None):
    """A callable `(model, inputs, targets, **kwargs) -> np.ndarray` for Quantus metrics.

    method: a method output of the converted model (default: its first); kwargs Quantus passes
    (`device`, or `method=` / `alpha=` overrides in explain_func_kwargs) are accepted."""
    from .runtime import Explainer
    ex = Explainer(model_path, providers=providers, threads=threads)
    if not ex.methods:
        raise OptionError("the model has no attribution outputs; convert it with --methods")
    default = method or ex.methods[0]
    if default not in ex.methods:
        raise OptionError(f"method '{default}' is not an output of this model ({', '.join(ex.methods)})")
    channel_axis = int(ex.meta.get("dconnx.channel_axis", "1"))

    def explain_func(model=None, inputs=None, targets=None, **kwargs) -> np.ndarray:
        m = kwargs.get("method") or default
        if m not in ex.methods:
            raise OptionError(f"method '{m}' is not an output of this model ({', '.join(ex.methods)})")
        a = kwargs.get("alpha", alpha)
        x = _numpy(inputs)
        t = None if targets is None else np.atleast_1d(_numpy(targets)).astype(np.int64).reshape(-1)
        maps = []
        for s in range(0, x.shape[0], batch_size):
            tt = None if t is None else (t if t.shape[0] == 1 else t[s:s + batch_size])
            maps.append(ex.maps(x[s:s + batch_size], target=tt, alpha=a)[m])
        heat = np.concatenate(maps).astype(np.float32)
        if heat.ndim == x.ndim - 1:    # [N, H, W] → with the input's channel axis, size 1
            heat = np.expand_dims(heat, channel_axis)
        return heat

    explain_func.explainer = ex
    explain_func.method = default
    return explain_func
