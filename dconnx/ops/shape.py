"""Data-movement ops: each stream moves the same way; relevance is moved, not redistributed.

All of them must leave axis 0 (the batch) alone: cotangents of several
streams are stacked along it.
"""
from __future__ import annotations

import numpy as np

from ..ir import attrs
from .registry import OpSpec, canonical_rewrite, op_spec
from .base import LinearMap, deflinear, set_streams
from .checks import not_along_batch
from .elementwise import constant_streams

BIG = 2 ** 62


class MoveMap(LinearMap):
    kind = "move"
    nonneg = True

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.in_shape = comp.view.shape(self.x)
        self.out_shape = comp.view.shape(self.y)

    def apply(self, x, variant="W"):
        if variant == "neg":
            return self.b.zeros_like(self.y)
        ins = [x] + list(self.node.input[1:])
        return self.b.op(self.node.op_type, ins, hint=f"{self.y}::{self.node.op_type.lower()}",
                         **self.attrs)

    def transpose(self, ct, variant="W"):
        assert variant != "neg", "nonnegative maps have no negative part"
        return self.adjoint(ct)

    def adjoint(self, ct):
        raise NotImplementedError


class ReshapeMap(MoveMap):
    def adjoint(self, ct):
        return self.b.reshape(ct, [-1] + list(self.in_shape[1:]), hint=f"{self.x}::reshapeT")


class TransposeMap(MoveMap):
    def adjoint(self, ct):
        perm = list(self.attrs["perm"])
        inv = [perm.index(i) for i in range(len(perm))]
        return self.b.op("Transpose", [ct], perm=inv, hint=f"{self.x}::transposeT")


class SqueezeMap(MoveMap):
    def adjoint(self, ct):
        return self.b.reshape(ct, [-1] + list(self.in_shape[1:]), hint=f"{self.x}::squeezeT")


class PadMap(MoveMap):
    """Constant-0 Pad: the adjoint crops."""

    def adjoint(self, ct):
        pads = [int(v) for v in self.comp.view.const(self.node.input[1])]
        rank = len(self.in_shape)
        axes = list(range(rank))
        if len(self.node.input) > 3 and self.node.input[3]:
            axes = [int(a) % rank for a in self.comp.view.const(self.node.input[3])]
        keep = [i for i, a in enumerate(axes) if a != 0]   # the batch axis is never padded
        starts = [pads[i] for i in keep]
        ends = [pads[i] + self.in_shape[axes[i]] for i in keep]
        return self.b.slice(ct, starts, ends, [axes[i] for i in keep], hint=f"{self.x}::padT")


class SliceMap(MoveMap):
    """Slice with unit steps: the adjoint pads with zeros."""

    def adjoint(self, ct):
        rank = len(self.in_shape)
        v = self.comp.view
        starts = [int(s) for s in v.const(self.node.input[1])]
        ends = [int(e) for e in v.const(self.node.input[2])]
        axes = [int(a) % rank for a in v.const(self.node.input[3])] if len(self.node.input) > 3 \
            and self.node.input[3] else list(range(len(starts)))
        before, after = [0] * rank, [0] * rank
        for s, e, a in zip(starts, ends, axes):
            dim = self.in_shape[a]
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
            before[a], after[a] = s, dim - e
        return self.b.op("Pad", [ct, self.b.ints(before + after)], mode="constant",
                         hint=f"{self.x}::sliceT")


class IndexMoveMap(MoveMap):
    """A fixed gather within each sample: y[j] = x[idx[j]] over the flattened non-batch axes
    (Slice with steps, Gather with constant indices, Expand, Tile, DepthToSpace/SpaceToDepth,
    Pad in reflect/edge mode). The map is found by running the node on the positions
    0..K−1 of one sample; its adjoint scatter-adds every output back to its source."""

    def __init__(self, comp, node):
        super().__init__(comp, node)
        self.k_in = int(np.prod(self.in_shape[1:]))
        self.k_out = int(np.prod(self.out_shape[1:]))

    def index(self) -> str:
        """int64 [1, K_out]: the source position of every output position."""
        def make():
            src = gather_index(self.comp.view, self.node, self.in_shape)
            return self.b.const(src.reshape(1, -1), hint=f"{self.y}::srcidx")
        return self.comp.cached(("srcidx", self.y), make)

    def adjoint(self, ct):
        b = self.b
        upd = b.reshape(ct, [-1, self.k_out], hint=f"{self.x}::upd")
        lead = b.shape_of(upd, 0, 1)
        idx = b.op("Expand", [self.index(), b.concat([lead, b.ints([self.k_out])], axis=0)])
        zeros = b.op("ConstantOfShape", [b.concat([lead, b.ints([self.k_in])], axis=0)],
                     value=_zero_tensor(b.float_dtype))
        out = b.op("ScatterElements", [zeros, idx, upd], axis=1, reduction="add", hint=f"{self.x}::gatherT")
        return b.reshape(out, [-1] + list(self.in_shape[1:]), hint=f"{self.x}::moveT")


def _zero_tensor(dtype):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.zeros([1], dtype=dtype))


def gather_index(view, node, in_shape) -> np.ndarray:
    """The source position (within one sample) of every output position of a data-movement node,
    by evaluating it on the positions themselves (exact in float64 up to 2^53)."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    k_in = int(np.prod(in_shape[1:]))
    pos = np.arange(k_in, dtype=np.float64).reshape([1] + list(in_shape[1:]))
    feeds = {node.input[0]: pos}
    inits = []
    for name in node.input[1:]:
        if name:
            v = view.const(name)
            if node.op_type == "Expand":        # per sample: the batch axis broadcasts from 1
                v = np.asarray(v).copy()
                v[0] = 1
            inits.append(numpy_helper.from_array(np.asarray(v), name))
    g = helper.make_graph([node], "move", [helper.make_tensor_value_info(node.input[0], 11, None)],
                          [helper.make_tensor_value_info(node.output[0], 0, None)], initializer=inits)
    out = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])).run(None, feeds)[0]
    return np.asarray(out)[:1].reshape(-1).astype(np.int64)


def _const_operands(view, node, final):
    for i in node.input[1:]:
        if i and view.const(i) is None and final:
            return f"operand '{i}' is not constant"
    return None


def _batch_kept(view, node):
    xs, ys = view.shape(node.input[0]), view.shape(node.output[0])
    if xs is None or ys is None or len(xs) != len(ys):
        return "the rank changes or is unknown"
    if isinstance(xs[0], int) and isinstance(ys[0], int) and xs[0] != ys[0]:
        return "changes the batch axis"
    if isinstance(xs[0], int) != isinstance(ys[0], int):
        return "changes the batch axis"
    return None


def _check_gather(view, node, data_in, final):
    if node.input[0] not in data_in or len(data_in) > 1:
        return "only constant indices into data are supported"
    if int(attrs(node).get("axis", 0)) % max(view.rank(node.input[0]) or 1, 1) == 0:
        return "gathers along the batch axis"
    return _const_operands(view, node, final)


def _check_move(view, node, data_in, final):
    """Expand, Tile, DepthToSpace, SpaceToDepth: constant operands, batch axis kept."""
    if len(data_in) > 1 or node.input[0] not in data_in:
        return "only the first operand may be data"
    why = _const_operands(view, node, final)
    if why or not final:
        return why
    if node.op_type == "Tile" and int(np.asarray(view.const(node.input[1]))[0]) != 1:
        return "tiles the batch axis"
    return _batch_kept(view, node)


def _pad_map(comp, node):
    return PadMap(comp, node) if attrs(node).get("mode", "constant") == "constant" else IndexMoveMap(comp, node)


def _slice_map(comp, node):
    steps = comp.view.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    return SliceMap(comp, node) if steps is None or np.all(np.asarray(steps) == 1) else IndexMoveMap(comp, node)


def _check_pad(view, node, data_in, final):
    a = attrs(node)
    if a.get("mode", "constant") not in ("constant", "reflect", "edge"):
        return f"pad mode '{a.get('mode')}' is not supported (constant 0, reflect, edge)"
    if a.get("mode", "constant") != "constant":
        why = _const_operands(view, node, final)
        if why:
            return why
    if len(node.input) > 2 and node.input[2]:
        v = view.const(node.input[2])
        if (v is None and final) or (v is not None and np.any(v != 0)):
            return "only zero padding is supported"
    pads = view.const(node.input[1]) if len(node.input) > 1 and node.input[1] else \
        np.asarray(a.get("pads", []))
    if pads is not None and np.any(np.asarray(pads) < 0):
        return f"negative pads {np.asarray(pads).tolist()} (cropping) are not supported"
    return None


def _check_slice(view, node, data_in, final):
    if len(node.input) > 4 and node.input[4]:
        steps = view.const(node.input[4])
        if steps is None and final:
            return "the steps are not constant"
        if steps is not None and np.any(steps != 1) and final:
            return _const_operands(view, node, final) or _batch_kept(view, node)
    return None


def _check_transpose(view, node, data_in, final):
    if list(attrs(node).get("perm", [0]))[:1] != [0]:
        return "the permutation moves the batch axis"
    return None


def _check_flatten(view, node, data_in, final):
    if int(attrs(node).get("axis", 1)) != 1:
        return "flattening must keep the batch axis (axis=1)"
    return None


_MOVE = dict(shift=False, recenter=False, keeps_sign=True, zero_n=True)
deflinear("Reshape", "shape", ReshapeMap, **_MOVE, shape_op=True,
          doc="constant target shape that keeps the batch axis (Flatten is rewritten to it)")
deflinear("Transpose", "shape", TransposeMap, **_MOVE, shape_op=True, check=_check_transpose,
          doc="any permutation that keeps axis 0 first")
deflinear("Squeeze", "shape", SqueezeMap, **_MOVE, shape_op=True, doc="constant axes, not axis 0")
deflinear("Unsqueeze", "shape", SqueezeMap, **_MOVE, shape_op=True, doc="constant axes, not axis 0")
deflinear("Pad", "shape", _pad_map, **_MOVE, check=_check_pad,
          doc="mode constant with value 0, reflect or edge; nonnegative pads, batch axis unpadded")
deflinear("Slice", "shape", _slice_map, **_MOVE, shape_op=True, check=_check_slice,
          doc="constant starts/ends/axes/steps (any sign), batch axis untouched")
deflinear("Gather", "shape", IndexMoveMap, **_MOVE, shape_op=True, check=_check_gather,
          doc="constant indices into data, not along the batch axis; the adjoint scatter-adds")
for _op in ("Expand", "Tile", "DepthToSpace", "SpaceToDepth"):
    deflinear(_op, "shape", IndexMoveMap, **_MOVE, shape_op=_op in ("Expand", "Tile"), check=_check_move,
              doc="constant operands, batch axis kept; the adjoint scatter-adds every copy back")

canonical_rewrite("Identity", "shape", "removed", "remove_identity", shape_op=True)
canonical_rewrite("Cast", "shape", "removed between float types: the model is computed in its input's float "
                  "type throughout", "remove_same_type_cast", shape_op=True)
canonical_rewrite("Dropout", "shape", "removed (inference)", "remove_identity")
canonical_rewrite("Flatten", "shape", "Reshape", "flatten_to_reshape", check=_check_flatten)
canonical_rewrite("Constant", "shape", "folded into initializers", "constants_to_initializers",
                  shape_op=True)
canonical_rewrite("Shape", "shape", "folded where the shape is static (integer subgraphs are never split)",
                  "fold_constants", shape_op=True, metadata_only=True)


# -- Concat: several inputs, one output ------------------------------------


def _pieces(comp, node, whole: str, pieces) -> tuple[int, list[int], np.ndarray]:
    """(axis, piece sizes, offsets) of a Concat's inputs or a Split's outputs along its axis."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % comp.view.rank(whole)
    sizes = [comp.view.shape(t)[axis] for t in pieces]
    return axis, sizes, np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def _concat_offsets(comp, node):
    return _pieces(comp, node, node.output[0], node.input)


def split_concat(comp, node):
    axis, _, _ = _concat_offsets(comp, node)
    pairs = [comp.stream(i) if comp.view.is_data(i) else constant_streams(comp, i)
             for i in node.input]
    b = comp.b
    y = node.output[0]
    P = b.concat([sp.p for sp in pairs], axis=axis, hint=f"{y}::P")
    N = b.concat([sp.n for sp in pairs], axis=axis, hint=f"{y}::N")
    set_streams(comp, y, P, N, recenter=False)


def backward_concat(comp, node, rs, cts):
    axis, sizes, _ = _concat_offsets(comp, node)
    pieces = rs.move_multi(cts[0], lambda t: comp.b.split(t, sizes, axis, hint=f"{node.output[0]}::concatT"))
    return [(name, piece) for name, piece in zip(node.input, pieces) if comp.view.is_data(name)]


# -- Split: one input, several outputs -------------------------------------
op_spec(OpSpec("Concat", "shape", split=split_concat, backward=backward_concat, **_MOVE, shape_op=True,
               check=not_along_batch, doc="along a non-batch axis; constant operands allowed"))




def _split_geometry(comp, node):
    return _pieces(comp, node, node.input[0], node.output)


def split_split(comp, node):
    axis, sizes, _ = _split_geometry(comp, node)
    sp = comp.stream(node.input[0])
    b = comp.b
    ps = b.split(sp.p, sizes, axis, hint=f"{node.output[0]}::Psplit")
    ns = b.split(sp.n, sizes, axis, hint=f"{node.output[0]}::Nsplit")
    for o, p, n in zip(node.output, ps, ns):
        set_streams(comp, o, p, n, recenter=False)


class SplitPieceMap(LinearMap):
    """Output j of a Split: the adjoint pads piece j back to the full size."""
    kind = "move"
    nonneg = True

    def __init__(self, comp, node, j, axis, start, total):
        super().__init__(comp, node, node.input[0], node.output[j])
        self.axis, self.start, self.total = axis, start, total
        self.size = comp.view.shape(node.output[j])[axis]

    def transpose(self, ct, variant="W"):
        rank = self.comp.view.rank(self.x)
        pads = [0] * (2 * rank)
        pads[self.axis] = self.start
        pads[rank + self.axis] = self.total - self.start - self.size
        return self.b.op("Pad", [ct, self.b.ints(pads)], mode="constant", hint=f"{self.x}::splitT")


def backward_split(comp, node, rs, cts):
    axis, sizes, offsets = _split_geometry(comp, node)
    total = int(offsets[-1])
    out = []
    for j, ct in enumerate(cts):
        if ct is not None:
            lin = SplitPieceMap(comp, node, j, axis, int(offsets[j]), total)
            out.append((node.input[0], rs.linear(ct, lin)))
    return out


op_spec(OpSpec("Split", "shape", split=split_split, backward=backward_split, **_MOVE, shape_op=True,
               check=not_along_batch, doc="along a non-batch axis"))
