"""float64 execution of ONNX models with onnx.reference, for the checks onnxruntime's CPU
provider cannot run (it has no float64 Conv, ConvTranspose or pooling)."""
import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_max_pool import MaxPool as _StockMaxPool


class GatherElements(OpRun):
    """np.take_along_axis (the stock implementation uses np.choose, limited to 64 choices)."""

    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, idx, axis=axis),)


class ConvTranspose(OpRun):
    """Grouped transposed convolution, one stock group=1 call per group (the stock
    implementation reshapes grouped weights wrongly)."""

    def _run(self, X, W, B=None, group=None, **kw):
        from onnx.reference.ops.op_conv_transpose import ConvTranspose as Stock
        g = group or 1
        kw = {k: v for k, v in kw.items() if v is not None}
        if g == 1:
            return Stock._run(self, X, W, B, group=1, **kw)
        cin, cout = X.shape[1] // g, W.shape[1]
        outs = [Stock._run(self, X[:, i * cin:(i + 1) * cin], W[i * cin:(i + 1) * cin],
                           None if B is None else B[i * cout:(i + 1) * cout], group=1, **kw)[0]
                for i in range(g)]
        return (np.concatenate(outs, axis=1),)


class MaxPool(_StockMaxPool):
    """MaxPool whose Indices output is right when the window is the whole map (the stock
    implementation's indices are wrong there); a plain loop over windows, first maximum."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        if len(self.onnx_node.output) < 2 or not self.onnx_node.output[1] or \
                auto_pad not in (None, "NOTSET", b"NOTSET"):
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                              kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                              strides=strides)
        import itertools
        k = list(kernel_shape)
        nd = len(k)
        s, d = list(strides or [1] * nd), list(dilations or [1] * nd)
        p = list(pads or [0] * (2 * nd))
        sp = x.shape[2:]
        out = []
        for i in range(nd):
            span = sp[i] + p[i] + p[nd + i] - d[i] * (k[i] - 1) - 1
            o = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
            if ceil_mode and (o - 1) * s[i] >= sp[i] + p[i]:
                o -= 1
            out.append(o)
        lead = x.shape[:2]
        flat = x.reshape(lead + (-1,))
        base = (np.arange(int(np.prod(lead))) * int(np.prod(sp))).reshape(lead)
        y = np.empty(lead + tuple(out), x.dtype)
        idx = np.empty(lead + tuple(out), np.int64)
        for o in itertools.product(*[range(v) for v in out]):
            best, arg = None, None
            for kk in itertools.product(*[range(v) for v in k]):
                pos = [o[i] * s[i] - p[i] + kk[i] * d[i] for i in range(nd)]
                if any(q < 0 or q >= sp[i] for i, q in enumerate(pos)):
                    continue
                j = int(np.ravel_multi_index(pos, sp))
                v = flat[..., j]
                if best is None:
                    best, arg = v.copy(), np.full(lead, j)
                else:
                    take = v > best
                    best = np.where(take, v, best)
                    arg = np.where(take, j, arg)
            y[(...,) + o] = best
            idx[(...,) + o] = arg + base
        return (y, idx)


def run_reference(model, feeds: dict) -> dict:
    ev = ReferenceEvaluator(model, new_ops=[GatherElements, ConvTranspose, MaxPool])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ev.run(None, feeds)))
