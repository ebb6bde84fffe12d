"""Split: the forward DC split of the canonical graph (docs/method.md §2).

Every data tensor on the way to the explained output gets its stream pair;
the converted model gains the outputs `g` and `h` (g − h = the logits).
"""
from __future__ import annotations

import numpy as np
import onnx

from dconnx.compilation import StreamPair
from dconnx.errors import OptionError
from dconnx.ir import node_label
from dconnx.ops import EXPLAINS_INPUT, SPLIT_RULES, SUPPORTED, TWO_DATA, ZERO_N_PRESERVING
from dconnx.ops.fused import find_fusions, fused_interior

from . import Pass, PassResult


def is_shift_point(comp, node: onnx.NodeProto) -> bool:
    key = node_key(node)
    if comp.fusions and key in comp.fusions:
        return True           # an activation exported as a subgraph (its last node)
    if comp.fused_interior and key in comp.fused_interior:
        return False
    info = SUPPORTED.get(node.op_type)
    if info is None:
        return False
    if info.shift == TWO_DATA:
        return sum(1 for i in node.input if i and comp.view.is_data(i)) == 2
    return bool(info.shift)


def ancestors(comp, tensor: str) -> set[str]:
    """Names of the nodes that `tensor` depends on."""
    seen, stack = set(), [tensor]
    out = set()
    while stack:
        t = stack.pop()
        node = comp.view.producer.get(t)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out.add(node.name or node.output[0])
        stack.extend(i for i in node.input if i)
    return out


def node_key(node) -> str:
    return node.name or node.output[0]


def choose_explained(comp) -> str:
    view = comp.view
    outs = view.output_names
    name = comp.opts.output or outs[0]
    if name not in outs:
        raise OptionError(f"'{name}' is not an output of the model (outputs: {', '.join(outs)})")
    prod = view.producer.get(name)
    if prod is not None and prod.op_type in EXPLAINS_INPUT:
        comp.notes.append(f"explaining the logits '{prod.input[0]}' (input of {prod.op_type} "
                          f"'{node_label(prod)}'), not the probabilities '{name}'")
        name = prod.input[0]
    shape = view.shape(name)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        raise OptionError(f"the explained output '{name}' must have shape [batch, classes] or "
                          f"[batch, classes, *spatial] (a dense output); it has {shape}")
    return name


def is_dense(comp) -> bool:
    """A dense (segmentation) output [batch, classes, *spatial]: the explained scalar is the
    target class summed over the `region` input."""
    return len(comp.view.shape(comp.explained)) > 2


def add_region_input(comp) -> None:
    """`region` (float [batch, *spatial] mask, default all ones: every position) for a dense
    explained output; comp.region_mask is it as [batch, 1, *spatial]."""
    b = comp.b
    shape = comp.view.shape(comp.explained)
    k = len(shape) - 2
    name = b.fresh("region", exact=True)
    b.initializers.append(onnx.numpy_helper.from_array(np.ones([1] * (1 + k), dtype=b.float_dtype), name))
    # every dim symbolic: the default [1, 1, ...] broadcasts over the batch and the positions
    dims = ["region_batch"] + [f"region_{i}" for i in range(k)]
    comp.new_inputs.append(onnx.helper.make_tensor_value_info(name, comp.float_type, dims))
    comp.region_input = name
    comp.region_mask = b.unsqueeze(name, [1], hint="dc/region_mask")
    comp.notes.append(f"dense output {shape}: explaining the target class summed over the input "
                      f"'{name}' ([batch, {', '.join(str(d) for d in shape[2:])}] mask, default all ones); "
                      "g and h are [batch, classes], region-summed")


def region_sum(comp, t: str, hint: str) -> str:
    """Σ over the spatial axes of t ⊙ region: [batch, classes, *spatial] -> [batch, classes]."""
    b = comp.b
    k = len(comp.view.shape(comp.explained)) - 2
    return b.reduce_sum(b.mul(t, comp.region_mask), list(range(2, 2 + k)), keepdims=0, hint=hint)


def plan_output(comp) -> None:
    """The explained output, its output layer(s) (no α-shift) and the nodes it depends on."""
    comp.explained = choose_explained(comp)
    comp.output_layers = find_output_layers(comp)
    comp.needed_nodes = ancestors(comp, comp.explained)


def find_output_layers(comp) -> set[str]:
    """The shift-point nodes whose outputs reach the explained output through non-shift ops
    only (on every branch); their α-shift is skipped, as the authors skip their output layer's."""
    found, seen, stack = set(), set(), [comp.explained]
    while stack:
        node = comp.view.producer.get(stack.pop())
        if node is None or node_key(node) in seen:
            continue
        seen.add(node_key(node))
        if is_shift_point(comp, node):
            found.add(node_key(node))
            continue
        stack.extend(i for i in node.input if i and comp.view.is_data(i))
    return found


def propagate_zero_n(comp, node: onnx.NodeProto) -> None:
    """Mark the outputs' n-streams structurally zero when every input's is (after a recentered
    Relu, say), so that later rules skip them: a zero n-stream costs no product. The ops that
    map a zero n-stream to a zero n-stream (data movement, winner-takes-all or window-sum max
    pooling, nonnegative pooling without a bias) say so in their OpSpec (`zero_n`)."""
    if node.op_type not in ZERO_N_PRESERVING:
        return
    ins = [i for i in node.input if i and comp.view.is_data(i)]
    if node.op_type == "Concat" and len(ins) != sum(1 for i in node.input if i):
        return      # constant pieces may have an n part
    if ins and all(i in comp.streams and comp.is_zero(comp.stream(i).n) for i in ins):
        for o in node.output:
            if o and o in comp.streams:
                comp.zero_streams.add(comp.stream(o).n)


def detect_channel_axis(comp) -> int:
    """NCHW unless the input goes through a Transpose to channel-first (an NHWC export)."""
    x = comp.view.data_inputs[0].name
    rank = comp.view.rank(x) or 4
    given = comp.opts.channel_axis
    if given is not None:
        if not -rank < given < rank or given % rank == 0:
            raise OptionError(f"channel_axis={given} is not a non-batch axis of the input (rank {rank})")
        return given % rank
    from dconnx.compilation import channel_last_to_first
    return channel_last_to_first(comp.view, x) or 1


class Split(Pass):
    name = "split"

    def requires(self, comp):
        inputs = comp.view.data_inputs
        if len(inputs) != 1:
            raise OptionError(f"dconnx explains models with one data input; this one has "
                              f"{len(inputs)} ({', '.join(i.name for i in inputs)})")

    def run(self, comp) -> PassResult:
        res = PassResult(self.name)
        view, b = comp.view, comp.b
        x = view.data_inputs[0].name
        comp.input_name = x
        comp.fusions = find_fusions(view)
        comp.fused_interior = fused_interior(comp.fusions)
        plan_output(comp)
        comp.input_channel_axis = detect_channel_axis(comp)
        res.notes.append(f"input '{x}' {view.shape(x)}: channel axis {comp.input_channel_axis} "
                         f"({'given' if comp.opts.channel_axis is not None else 'detected'}); maps are "
                         f"[batch, {', '.join(str(d) for d in comp.spatial_shape(x))}]")
        comp.streams[x] = StreamPair(b.relu(x, hint=f"{x}::p"), b.relu(b.neg(x), hint=f"{x}::n"))
        for node in comp.model.graph.node:
            if node_key(node) not in comp.needed_nodes or node_key(node) in comp.fused_interior:
                continue
            if not any(i and view.is_data(i) for i in node.input):
                continue
            if not any(o and view.is_data(o) for o in node.output):
                continue      # reads only the data's shape (a Shape feeding Resize sizes)
            SPLIT_RULES[node.op_type](comp, node)
            propagate_zero_n(comp, node)
            res.apply(f"{node.op_type} {node_label(node)}")
        sp = comp.stream(comp.explained)
        ftype = comp.float_type
        shape = view.shape(comp.explained)
        if is_dense(comp):
            add_region_input(comp)
            sp = StreamPair(region_sum(comp, sp.p, "dc/g_region"), region_sum(comp, sp.n, "dc/h_region"))
            shape = shape[:2]
        for stream, name in ((sp.p, "g"), (sp.n, "h")):
            out = b.fresh(name, exact=True)
            b.op("Identity", [stream], out=out, hint=f"dc/{name}")
            comp.new_outputs.append(onnx.helper.make_tensor_value_info(out, ftype, shape))
        res.notes.append(f"explaining '{comp.explained}'; output layer(s): "
                         f"{', '.join(sorted(comp.output_layers)) or 'none'}")
        return res

    def ensures(self, comp):
        """Every float data tensor the explained output depends on has its two streams, and the
        model gains the outputs g and h."""
        view = comp.view
        produced = {o for n in comp.b.nodes for o in n.output} | {i.name for i in comp.model.graph.input}
        needed = [comp.input_name] + [o for node in comp.model.graph.node
                                      if node_key(node) in comp.needed_nodes
                                      and node_key(node) not in comp.fused_interior
                                      and any(i and view.is_data(i) for i in node.input)
                                      for o in node.output
                                      if o and o in view.data_tensors and view.is_float(o)]
        for t in needed:
            sp = comp.streams.get(t)
            if sp is None:
                raise self.broken(f"no streams for the data tensor '{t}'")
            for part in (sp.p, sp.n):
                if not part or (part not in produced and part not in view.data_tensors):
                    raise self.broken(f"stream '{part}' of '{t}' is produced by no node")
        names = [vi.name for vi in comp.new_outputs]
        if not {"g", "h"} <= set(names):
            raise self.broken(f"the outputs g and h are missing (new outputs: {names})")
