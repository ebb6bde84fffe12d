"""Backward: ONE generic reverse walk over the canonical graph.

The walk visits the nodes between the requested layers and the explained
output in reverse topological order, sums the contributions that reach a
tensor from its consumers, and asks each node's backward rule
(`dconnx.ops`) what flows to its inputs. What that is — split
sensitivities, relevance, a plain gradient — is decided by the rule sets
given to the walk; several rule sets share one walk. The α-shift is applied
at every shift-point node but the output layer.
"""
from __future__ import annotations

import numpy as np
import onnx

from dconnx.ops import BACKWARD_RULES, LINEAR_MAPS

from . import Pass, PassResult
from .split import ancestors, is_shift_point, node_key


def descendants(comp, tensors: set[str]) -> set[str]:
    live = set(tensors)
    out = set()
    for node in comp.model.graph.node:
        if any(i in live for i in node.input if i):
            live.update(o for o in node.output if o)
            out.add(node_key(node))
    return out


def reverse_walk(comp, rulesets, seeds: dict, wanted: set[str], start: str | None = None) -> dict:
    """Cotangents {(ruleset name, tensor): cotangent} at every wanted tensor, walking back
    from `start` (default: the explained output)."""
    start = start or comp.explained
    relevant = (comp.needed_nodes if start == comp.explained else ancestors(comp, start)) & \
        descendants(comp, wanted)
    pending = {rs.name: {start: [seeds[rs.name]]} for rs in rulesets}
    done: dict = {}

    def total(rs, tensor):
        key = (rs.name, tensor)
        if key not in done:
            cts = pending[rs.name].get(tensor)
            done[key] = rs.accumulate(cts, tensor) if cts else None
        return done[key]

    for node in reversed(list(comp.model.graph.node)):
        if node_key(node) not in relevant:
            continue
        shift = is_shift_point(comp, node) and node_key(node) not in comp.output_layers
        for rs in rulesets:
            outs = [total(rs, o) if o else None for o in node.output]
            if all(c is None for c in outs):
                continue
            for inp, ct in BACKWARD_RULES[node.op_type](comp, node, rs, outs):
                if shift:
                    ct = rs.shift(ct, shift_factor(comp, node))
                pending[rs.name].setdefault(inp, []).append(ct)
    result = {}
    for rs in rulesets:
        for t in wanted:
            ct = total(rs, t)
            if ct is not None:
                result[(rs.name, t)] = ct
    return result


def shift_factor(comp, node) -> str:
    """1 − 2α at this node: the global α input, or the per-layer Frobenius α."""
    if comp.opts.alpha_mode == "frobenius":
        w = _weight_of(comp, node)
        if w is not None:
            def make():
                norm = float(np.linalg.norm(w.astype(np.float64)))
                a = max(0.0, (1.0 - 1.0 / norm) / 2.0) if norm > 0 else 0.0
                return comp.b.scalar(1.0 - 2.0 * a)
            return comp.cached(("frob", node_key(node)), make)
    return comp.shift_factor


def _weight_of(comp, node):
    """The weight of a weight-linear node (Conv/Gemm/MatMul, an unfolded BatchNorm's scale),
    read from the same LinearMap its split and backward rules use."""
    make = LINEAR_MAPS.get(node.op_type)
    if make is None:
        return None
    lin = make(comp, node)
    return lin.weight_value() if lin is not None and lin.kind == "weight" else None


class Backward(Pass):
    name = "backward"

    def requires(self, comp):
        if not comp.streams:
            raise RuntimeError("the backward pass needs the split pass first")

    def run(self, comp) -> PassResult:
        res = PassResult(self.name)
        from .heads import plan_heads, rulesets_for
        plan_heads(comp)
        rulesets = rulesets_for(comp)
        if not rulesets:
            return res
        _add_run_time_inputs(comp)
        wanted = {h.tensor for h in comp.heads} | set(comp.exposed_tensors())
        if comp.opts.inject is not None:
            start = _add_inject_input(comp)
            wanted |= {t for _, t in comp.collected()}
            seeds = {rs.name: rs.inject(comp.inject_input) for rs in rulesets}
        else:
            start = None
            seeds = {rs.name: rs.seed(comp.seed) for rs in rulesets}
        _note_layers_without_alpha(comp, start or comp.explained)
        comp.cotangents = reverse_walk(comp, rulesets, seeds, wanted, start)
        comp.rulesets = {rs.name: rs for rs in rulesets}
        for rs in rulesets:
            res.apply(f"rule set {rs.name}")
        return res

    def ensures(self, comp):
        """Every sensitivity a head, an exposed or a collected layer needs exists: one part per
        the rule set's parts, each a tensor some node produces (its rank is checked on the
        final graph by optimize)."""
        if not comp.rulesets:
            return
        produced = {o for n in comp.b.nodes for o in n.output} | set(comp.view.data_tensors) | \
            {t.name for t in comp.b.initializers}
        wanted = [(_ruleset_of(h.method), h.tensor) for h in comp.heads]
        wanted += [("split", t) for t in comp.exposed_tensors()]
        wanted += [(_ruleset_of(h.method), t) for _, t in comp.collected() for h in comp.heads]
        for rs_name, t in wanted:
            ct = comp.cotangents.get((rs_name, t))
            if ct is None:
                raise self.broken(f"no {rs_name} sensitivity at '{t}'")
            rs = comp.rulesets[rs_name]
            if not isinstance(ct, tuple) or len(ct) != rs.parts:
                raise self.broken(f"the {rs_name} sensitivity at '{t}' is {ct!r}, not {rs.parts} parts")
            for part in ct:
                if part is not None and part not in produced:
                    raise self.broken(f"the {rs_name} sensitivity at '{t}' names '{part}', which no "
                                      "node produces")


def _ruleset_of(method: str) -> str:
    from dconnx.methods import METHODS
    return METHODS[method].ruleset


def shift_points_above(comp, tensor: str, start: str | None = None) -> list[str]:
    """The α-shift points the backward walk crosses between `start` (default: the explained
    output) and `tensor`: what makes the split sensitivities at `tensor` depend on α."""
    start = start or comp.explained
    between = (comp.needed_nodes if start == comp.explained else ancestors(comp, start)) & \
        descendants(comp, {tensor})
    return [node_key(n) for n in comp.model.graph.node if node_key(n) in between
            and is_shift_point(comp, n) and node_key(n) not in comp.output_layers]


def _note_layers_without_alpha(comp, start: str) -> None:
    from dconnx.methods import METHODS
    for tensor, layer in dict.fromkeys((h.tensor, h.layer) for h in comp.heads
                                       if METHODS[h.method].ruleset == "split"):
        if not shift_points_above(comp, tensor, start):
            methods = ", ".join(h.method for h in comp.heads if h.tensor == tensor
                                and METHODS[h.method].ruleset == "split")
            comp.notes.append(
                f"alpha has no effect on {methods} at {layer} ('{tensor}'): no shift point "
                "(Conv/Gemm/BatchNorm/Relu/MaxPool/Add) lies between it and the output layer; "
                "choose a layer below the last Relu/Conv to see the alpha-shift")


def _add_inject_input(comp) -> str:
    """An input `inject` shaped like the injection layer's tensor; returns that tensor."""
    from dconnx.layers import resolve_layer
    tensor, desc = resolve_layer(comp.view, comp.input_name, comp.opts.inject)
    name = comp.b.fresh("inject", exact=True)
    comp.new_inputs.append(onnx.helper.make_tensor_value_info(name, comp.float_type, comp.view.shape(tensor)))
    comp.inject_input = name
    comp.notes.append(f"backward walk starts at {desc} from the input '{name}'")
    return tensor


def _add_run_time_inputs(comp):
    """`target` (int64 [n], −1 = argmax) and `alpha` (float scalar), each with a default."""
    b = comp.b
    view = comp.view
    shape = view.shape(comp.explained)
    k = shape[1]
    tname = b.fresh("target", exact=True)
    aname = b.fresh("alpha", exact=True)
    b.initializers.append(onnx.numpy_helper.from_array(np.asarray([-1], dtype=np.int64), tname))
    b.initializers.append(onnx.numpy_helper.from_array(np.asarray(comp.opts.alpha, dtype=b.float_dtype), aname))
    comp.new_inputs.append(onnx.helper.make_tensor_value_info(tname, onnx.TensorProto.INT64, ["target_batch"]))
    comp.new_inputs.append(onnx.helper.make_tensor_value_info(aname, comp.float_type, []))
    comp.target_input, comp.alpha_input = tname, aname
    scores = comp.explained
    if len(shape) > 2:      # dense: the class with the largest region-summed score
        from .split import region_sum
        scores = region_sum(comp, comp.explained, "dc/region_scores")
    argmax = b.op("ArgMax", [scores], axis=1, keepdims=0, hint="dc/argmax")
    use_argmax = b.op("Less", [tname, b.const(np.asarray(0, dtype=np.int64))], hint="dc/target_unset")
    target = b.op("Where", [use_argmax, argmax, tname], hint="dc/target_resolved")
    comp.target_resolved = target
    values = b.const(np.asarray([0.0, 1.0], dtype=b.float_dtype), hint="onehot_values")
    comp.seed = b.op("OneHot", [target, b.const(np.asarray(k, dtype=np.int64)), values], axis=-1,
                     hint="dc/seed")
    if len(shape) > 2:      # dense: onehot(target) ⊗ region, expanded to the output's shape
        onehot = b.unsqueeze(comp.seed, list(range(2, len(shape))), hint="dc/seed_dense")
        comp.seed = b.op("Expand", [b.mul(onehot, comp.region_mask), b.shape_of(comp.explained)],
                         hint="dc/seed_region")
    comp.shift_factor = b.sub(b.scalar(1.0), b.mul(b.scalar(2.0), aname), hint="dc/one_minus_2alpha")

