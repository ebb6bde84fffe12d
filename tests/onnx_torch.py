"""Run an ONNX graph with torch ops, in the graph's own precision (float64 included).

onnxruntime's CPU provider has no float64 Conv and onnx.reference is too slow for
VGG16-sized graphs; this interpreter covers the ops of exported CNNs and of the
graphs dconnx generates, so converted models can be checked in float64 at full size.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

_DTYPES = {1: torch.float32, 11: torch.float64, 10: torch.float16, 7: torch.int64, 6: torch.int32,
           9: torch.bool}


def _attrs(node):
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _pads(p, nd):
    """ONNX pads [b1, b2, ..., e1, e2, ...] → F.pad order (last dim first)."""
    out = []
    for i in reversed(range(nd)):
        out += [p[i], p[nd + i]]
    return out


def _conv(x, w, b, a, transpose=False):
    nd = x.dim() - 2
    k = a.get("kernel_shape", list(w.shape[2:]))
    s = a.get("strides", [1] * nd)
    d = a.get("dilations", [1] * nd)
    p = a.get("pads", [0] * (2 * nd))
    g = a.get("group", 1)
    assert a.get("auto_pad", "NOTSET") in ("NOTSET", "")
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if not transpose:
        if p[:nd] != p[nd:]:
            x = F.pad(x, _pads(p, nd))
            p = [0] * (2 * nd)
        if nd == 2 and g == x.shape[1] and w.shape[1] == 1 and x.dtype == torch.float64:
            return _depthwise(x, w, b, s, p[:nd], d)
        return fn(x, w, b, s, p[:nd], d, g)
    fnt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    op = a.get("output_padding", [0] * nd)
    # torch takes symmetric padding: pad with the begin values, crop the end difference
    y = fnt(x, w, b, s, 0, op, g, d)
    sl = [slice(None), slice(None)]
    for i in range(nd):
        sl.append(slice(p[i], y.shape[2 + i] - p[nd + i]))
    del k
    return y[tuple(sl)]


def _depthwise(x, w, b, s, p, d):
    """Depthwise 2-D convolution via unfold (torch's float64 depthwise kernel is slow on CPU)."""
    n, c, h, wd = x.shape
    mult = w.shape[0] // c
    k = w.shape[2:]
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s).view(n, c, 1, k[0] * k[1], -1)
    y = (cols * w.view(1, c, mult, k[0] * k[1], 1)).sum(3)
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    y = y.reshape(n, c * mult, oh, -1)
    return y if b is None else y + b.view(1, -1, 1, 1)


def _pool(x, a, kind):
    nd = x.dim() - 2
    k = a["kernel_shape"]
    s = a.get("strides", [1] * nd)
    d = a.get("dilations", [1] * nd)
    p = a.get("pads", [0] * (2 * nd))
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        xp = F.pad(x, _pads(p, nd), value=-float("inf"))
        fn = {1: F.max_pool1d, 2: F.max_pool2d}[nd]
        y, idx = fn(xp, k, s, 0, d, ceil_mode=ceil, return_indices=True)
        # indices into the padded plane → indices into the unpadded input, then flat over NCHW
        coords = []
        rem = idx
        padded = xp.shape[2:]
        for i in reversed(range(nd)):
            coords.insert(0, rem % padded[i] - p[i])
            rem = rem // padded[i]
        flat = torch.zeros_like(idx)
        for i in range(nd):
            flat = flat * x.shape[2 + i] + coords[i]
        n, c = x.shape[:2]
        plane = int(np.prod(x.shape[2:]))
        base = (torch.arange(n).view(-1, 1, *[1] * nd) * c + torch.arange(c).view(1, -1, *[1] * nd)) * plane
        return y, flat + base
    assert d == [1] * nd
    include = bool(a.get("count_include_pad", 0))
    if p[:nd] == p[nd:]:
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[nd]
        return fn(x, k, s, p[:nd], ceil, include)
    xp = F.pad(x, _pads(p, nd))
    ones = F.pad(torch.ones_like(x), _pads(p, nd), value=float(include))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[nd]
    return fn(xp, k, s, 0, ceil, True) / fn(ones, k, s, 0, ceil, True)


def _reduce(x, node, a, fn, env):
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = env[node.input[1]].tolist()
    keep = bool(a.get("keepdims", 1))
    if axes is None or len(axes) == 0:
        axes = list(range(x.dim()))
    return fn(x, dim=tuple(int(v) for v in axes), keepdim=keep)


def _resize(x, node, a, env):
    """ONNX Resize (nearest / linear, constant scales or sizes), axis by axis from the operator's
    definition: input coordinate per output position, nearest rounding or a two-point lerp."""
    scales = env[node.input[2]].tolist() if len(node.input) > 2 and node.input[2] else []
    sizes = env[node.input[3]].tolist() if len(node.input) > 3 and node.input[3] else None
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    assert mode in ("nearest", "linear") and int(a.get("antialias", 0)) == 0
    for ax in range(2, x.dim()):
        n_in = x.shape[ax]
        n_out = int(sizes[ax]) if sizes else int(math.floor(n_in * scales[ax]))
        s = n_out / n_in if sizes else float(scales[ax])
        if n_out == n_in and s == 1.0:
            continue
        # coordinates in the data's precision (onnxruntime: float32; float64 as torch computes them)
        i = torch.arange(n_out, dtype=x.dtype)
        s32 = torch.tensor(s, dtype=x.dtype)
        if coord == "half_pixel" or (coord == "pytorch_half_pixel" and n_out > 1):
            c = (i + 0.5) / s32 - 0.5
        elif coord == "pytorch_half_pixel":
            c = torch.zeros(n_out, dtype=x.dtype)
        elif coord == "align_corners":
            c = i * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros(n_out, dtype=x.dtype)
        elif coord == "asymmetric":
            c = i / s32
        else:
            raise NotImplementedError(coord)
        c = c.double()
        if mode == "nearest":
            frac = c - torch.floor(c)
            idx = {"floor": torch.floor(c), "ceil": torch.ceil(c),
                   "round_prefer_floor": torch.where(frac == 0.5, torch.floor(c), torch.floor(c + 0.5)),
                   "round_prefer_ceil": torch.where(frac == 0.5, torch.ceil(c), torch.floor(c + 0.5))}[nearest]
            x = x.index_select(ax, idx.clamp(0, n_in - 1).long())
        else:
            c = c.clamp(0, n_in - 1)
            i0 = torch.floor(c).long()
            i1 = (i0 + 1).clamp(max=n_in - 1)
            shape = [1] * x.dim()
            shape[ax] = n_out
            w = (c - i0).to(x.dtype).view(shape)
            x = x.index_select(ax, i0) * (1 - w) + x.index_select(ax, i1) * w
    return x


def _softplus(t):
    return t.clamp(min=0) + torch.log1p(torch.exp(-t.abs()))


def _gelu(t, a):
    if a.get("approximate", "none") == "tanh":
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2.0)))


# elementwise activations as the ONNX operators define them, with the attributes as stored
_ACTIVATIONS = {
    "Exp": lambda t, a: torch.exp(t),
    "Erf": lambda t, a: torch.erf(t),
    "Softplus": lambda t, a: _softplus(t),
    "Elu": lambda t, a: torch.where(t > 0, t, a.get("alpha", 1.0) * torch.expm1(t)),
    "Selu": lambda t, a: a.get("gamma", 1.05070102214813232421875) * torch.where(
        t > 0, t, a.get("alpha", 1.67326319217681884765625) * torch.expm1(t)),
    "Celu": lambda t, a: t.clamp(min=0) + (a.get("alpha", 1.0) * torch.expm1(t / a.get("alpha", 1.0))).clamp(max=0),
    "Gelu": _gelu,
    "Mish": lambda t, a: t * torch.tanh(_softplus(t)),
    "HardSigmoid": lambda t, a: (a.get("alpha", 0.2) * t + a.get("beta", 0.5)).clamp(0, 1),
    "HardSwish": lambda t, a: t * (t / 6 + 0.5).clamp(0, 1),
}


def run(model: onnx.ModelProto, feeds: dict) -> dict:
    """Evaluate every node in order; returns {output name: numpy array}."""
    env: dict = {}
    for t in model.graph.initializer:
        env[t.name] = torch.from_numpy(np.array(numpy_helper.to_array(t)))
    for k, v in feeds.items():
        env[k] = torch.from_numpy(np.asarray(v))
    outputs = {o.name for o in model.graph.output}
    last_use = {name: i for i, node in enumerate(model.graph.node) for name in node.input if name}
    with torch.no_grad():
        for step, node in enumerate(model.graph.node):
            ins = [env[i] if i else None for i in node.input]
            outs = _eval(node, ins, _attrs(node), env)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for name, val in zip(node.output, outs):
                if name:
                    env[name] = val
            for name in node.input:     # drop what no later node reads (float64 VGG16 kept GBs alive)
                if name and last_use[name] == step and name not in outputs:
                    env.pop(name, None)
    return {o.name: env[o.name].numpy() for o in model.graph.output}


def _eval(node, x, a, env):  # noqa: C901  (one branch per op, read as a table)
    op = node.op_type
    if op == "Conv":
        return _conv(x[0], x[1], x[2] if len(x) > 2 else None, a)
    if op == "ConvTranspose":
        return _conv(x[0], x[1], x[2] if len(x) > 2 else None, a, transpose=True)
    if op == "Gemm":
        A = x[0].T if a.get("transA", 0) else x[0]
        B = x[1].T if a.get("transB", 0) else x[1]
        y = a.get("alpha", 1.0) * (A @ B)
        return y + a.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else y
    if op == "MatMul":
        return x[0] @ x[1]
    simple = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
              "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Less": torch.lt, "Equal": torch.eq}
    if op in simple:
        if op == "Div" and not x[0].is_floating_point():
            return torch.div(x[0], x[1], rounding_mode="trunc")
        return simple[op](x[0], x[1])
    unary = {"Neg": torch.neg, "Abs": torch.abs, "Relu": torch.relu, "Identity": lambda t: t,
             "Sqrt": torch.sqrt, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh}
    if op in unary:
        return unary[op](x[0])
    if op in _ACTIVATIONS:
        return _ACTIVATIONS[op](x[0], a)
    if op in ("LessOrEqual", "And", "Or"):
        return {"LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or}[op](x[0], x[1])
    if op == "Dropout":
        return x[0]
    if op == "Max":
        out = x[0]
        for t in x[1:]:
            out = torch.maximum(out, t)
        return out
    if op == "Min":
        out = x[0]
        for t in x[1:]:
            out = torch.minimum(out, t)
        return out
    if op == "Mean":
        return sum(x[1:], x[0]) / len(x)
    if op == "GlobalMaxPool":
        return torch.amax(x[0], dim=tuple(range(2, x[0].dim())), keepdim=True)
    if op == "Sum":
        out = x[0]
        for t in x[1:]:
            out = out + t
        return out
    if op == "Where":
        return torch.where(x[0], x[1], x[2])
    if op == "Cast":
        return x[0].to(_DTYPES[a["to"]])
    if op == "Concat":
        return torch.cat(x, dim=a["axis"])
    if op == "Split":
        sizes = x[1].tolist() if len(x) > 1 and x[1] is not None else None
        axis = a.get("axis", 0)
        if sizes is None:
            n = a.get("num_outputs", len(node.output))
            sizes = [x[0].shape[axis] // n] * n
        return list(torch.split(x[0], sizes, dim=axis))
    if op == "Slice":
        starts, ends = x[1].tolist(), x[2].tolist()
        axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
        out = x[0]
        for s, e, ax, st in zip(starts, ends, axes, steps):
            dim = out.shape[ax]
            if st > 0:
                s = min(max(s + dim if s < 0 else s, 0), dim)
                e = min(max(e + dim if e < 0 else e, 0), dim)
                out = out.narrow(ax, s, max(e - s, 0)) if st == 1 else out.index_select(ax, torch.arange(s, e, st))
            else:
                s = min(max(s + dim if s < 0 else s, -1), dim - 1)
                e = min(max(e + dim if e < 0 else e, -1), dim - 1)
                idx = torch.arange(s, e, st)
                out = out.index_select(ax, idx)
        return out
    if op == "Pad":
        pads = x[1].tolist()
        nd = x[0].dim()
        val = float(x[2]) if len(x) > 2 and x[2] is not None else 0.0
        mode = a.get("mode", "constant")
        if mode != "constant":      # torch pads at most the last three axes in these modes
            fp = _pads(pads, nd)
            while len(fp) > 2 and not any(fp[-2:]):
                fp = fp[:-2]
            return F.pad(x[0], fp, mode={"edge": "replicate"}.get(mode, mode))
        return F.pad(x[0], _pads(pads, nd), value=val)
    if op == "Tile":
        return x[0].repeat(*[int(v) for v in x[1].tolist()])
    if op == "DepthToSpace":
        bs = a["blocksize"]
        n, c, h, w = x[0].shape
        if a.get("mode", "DCR") == "CRD":
            return F.pixel_shuffle(x[0], bs)
        t = x[0].reshape(n, bs, bs, c // bs ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
        return t.reshape(n, c // bs ** 2, h * bs, w * bs)
    if op == "Reshape":
        shape = [int(v) for v in x[1].tolist()]
        if not a.get("allowzero", 0):
            shape = [x[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return x[0].reshape(shape)
    if op == "Flatten":
        ax = a.get("axis", 1)
        return x[0].reshape(int(np.prod(x[0].shape[:ax])), -1)
    if op == "Transpose":
        return x[0].permute(*a["perm"])
    if op == "Squeeze":
        axes = x[1].tolist() if len(x) > 1 and x[1] is not None else a.get("axes")
        out = x[0]
        for ax in sorted((v % out.dim() for v in axes), reverse=True):
            out = out.squeeze(ax)
        return out
    if op == "Unsqueeze":
        axes = x[1].tolist() if len(x) > 1 and x[1] is not None else a.get("axes")
        out = x[0]
        for ax in sorted(v % (out.dim() + len(axes)) for v in axes):
            out = out.unsqueeze(ax)
        return out
    if op == "MaxPool":
        y, idx = _pool(x[0], a, "max")
        return [y, idx] if len(node.output) > 1 else y
    if op == "AveragePool":
        return _pool(x[0], a, "avg")
    if op == "GlobalAveragePool":
        return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)
    if op == "BatchNormalization":
        shape = [1, -1] + [1] * (x[0].dim() - 2)
        scale = x[1] / torch.sqrt(x[4] + a.get("epsilon", 1e-5))
        return (x[0] - x[3].view(shape)) * scale.view(shape) + x[2].view(shape)
    if op == "GatherElements":
        return torch.gather(x[0], a.get("axis", 0), x[1])
    if op == "ScatterElements":
        assert a.get("reduction") == "add"
        return x[0].scatter_add(a.get("axis", 0), x[1], x[2])
    if op == "Gather":
        ax = a.get("axis", 0) % x[0].dim()
        idx = x[1].reshape(-1)
        idx = torch.where(idx < 0, idx + x[0].shape[ax], idx)     # negative indices count from the end
        return torch.index_select(x[0], ax, idx).reshape(
            (*x[0].shape[:a.get("axis", 0)], *x[1].shape, *x[0].shape[a.get("axis", 0) + 1:]))
    if op == "Mod":
        return torch.remainder(x[0], x[1])
    if op == "Shape":
        s = list(x[0].shape)[a.get("start", 0):a.get("end", None)]
        return torch.tensor(s, dtype=torch.int64)
    if op == "ConstantOfShape":
        value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return torch.full([int(v) for v in x[0].tolist()], float(value.reshape(-1)[0]),
                          dtype=torch.from_numpy(value).dtype)
    if op == "Expand":
        shape = [int(v) for v in x[1].tolist()]
        return x[0].expand(*torch.broadcast_shapes(tuple(x[0].shape), tuple(shape)))
    if op == "ReduceSum":
        return _reduce(x[0], node, a, torch.sum, env)
    if op == "ReduceMean":
        return _reduce(x[0], node, a, torch.mean, env)
    if op == "ReduceMax":
        return _reduce(x[0], node, a, torch.amax, env)
    if op == "ReduceMin":
        return _reduce(x[0], node, a, torch.amin, env)
    if op == "Resize":
        return _resize(x[0], node, a, env)
    if op == "OneHot":
        depth = int(x[1])
        idx = x[0] % depth
        hot = F.one_hot(idx, depth).to(x[2].dtype)
        return hot * (x[2][1] - x[2][0]) + x[2][0]
    if op == "ArgMax":
        return torch.argmax(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))
    if op == "Softmax":
        return torch.softmax(x[0], dim=a.get("axis", -1))
    if op == "Clip":
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
        return torch.clamp(x[0], lo, hi)
    if op == "Constant":
        return torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))
    raise NotImplementedError(f"onnx_torch: no implementation for {op}")
