"""Optimize: assemble the converted model and remove what no output needs.

The generated graph is emitted eagerly by the rules (every stream, every
weight variant); this pass keeps only the nodes and initializers that reach
an output, folds the α-shift's scalar factors into the products
(scalar_factors.py), turns masked cotangents into products (mask_products.py), puts
ReLU6 blocks whose pieces only feed masks back into one Clip (clip_band.py), records the
conversion in the model's metadata, and sets the opset and IR version the pinned
onnxruntime accepts.
"""
from __future__ import annotations

import json

import onnx

from dconnx.io import MAX_IR_VERSION, validate

from . import Pass, PassResult, contracts_enabled
from .clip_band import clip_band_masks
from .mask_products import where_to_mul
from .scalar_factors import fold_scalar_factors

MIN_IR_FOR_OPSET17 = 8


def assemble(comp) -> onnx.ModelProto:
    """The canonical model plus everything the builder added. Built in place: the
    original weights are never copied."""
    model = comp.model
    g = model.graph
    b = comp.b
    g.node.extend(b.nodes)
    g.initializer.extend(b.initializers)
    g.input.extend(comp.new_inputs)
    g.output.extend(comp.new_outputs)
    del g.value_info[:]
    model.producer_name, model.producer_version = "dconnx", _version()
    model.ir_version = min(max(model.ir_version, MIN_IR_FOR_OPSET17), MAX_IR_VERSION)
    b.nodes, b.initializers = [], []
    comp.new_inputs, comp.new_outputs = [], []
    return model


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dconnx")
    except Exception:
        return "0"


def prune(model: onnx.ModelProto, keep_inputs=()) -> int:
    """Drop nodes and initializers no graph output depends on; returns how many nodes went.
    `keep_inputs` stay in the interface even when unused (the target/alpha contract)."""
    g = model.graph
    needed = {o.name for o in g.output} | set(keep_inputs)
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(g.node) - len(keep)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    for i in reversed(range(len(g.initializer))):    # in place: weights are not copied
        if g.initializer[i].name not in needed:
            del g.initializer[i]
    for i in reversed(range(len(g.input))):
        if g.input[i].name not in needed:
            del g.input[i]
    # a MaxPool Indices output nobody reads would still be computed: drop it
    for node in g.node:
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] not in needed:
            del node.output[1:]
    return removed


def metadata(comp) -> dict:
    o = comp.opts
    return {
        "dconnx.version": _version(),
        "dconnx.input": comp.input_name,
        "dconnx.explained": comp.explained,
        "dconnx.channel_axis": str(comp.input_channel_axis),
        "dconnx.methods": json.dumps([{"method": h.method, "output": h.output, "layer": h.layer,
                                       "tensor": h.tensor} for h in comp.heads]),
        "dconnx.options": json.dumps({
            "alpha_default": o.alpha, "alpha_mode": o.alpha_mode, "maxpool": o.maxpool,
            "stabilize": o.stabilize, "relu_backward": o.relu_backward, "ties": o.ties,
            "lrp_epsilon": o.lrp_epsilon, "normalize": o.normalize, "linear_form": o.linear_form,
            "share_forward": o.share_forward, "fold_batchnorm": o.fold_batchnorm,
            "weight_variants": o.weight_variants,
            "precision": o.precision}),
        "dconnx.preprocess": json.dumps({"mean": list(o.mean) if o.mean else None,
                                         "std": list(o.std) if o.std else None}),
        "dconnx.target_input": comp.target_input,
        "dconnx.alpha_input": comp.alpha_input,
        **({"dconnx.region_input": comp.region_input} if comp.region_input else {}),
        **_class_names(comp),
    }


def _class_names(comp) -> dict:
    """`dconnx.class_names` when the options give one name per explained class."""
    names = comp.opts.class_names
    classes = comp.view.shape(comp.explained)[1]
    if not names or len(names) != classes:
        return {}
    return {"dconnx.class_names": json.dumps(list(names))}


class Optimize(Pass):
    name = "optimize"

    def run(self, comp) -> PassResult:
        res = PassResult(self.name)
        model = assemble(comp)
        keep = [n for n in (comp.target_input, comp.alpha_input) if n]
        removed = prune(model, keep)
        res.apply(f"prune: removed {removed} unused nodes")
        folded = fold_scalar_factors(model, lambda m: prune(m, keep))
        if folded:
            res.apply(f"scalar factors: {folded} Muls by a scalar folded into a product or another scalar")
        masked = where_to_mul(model)
        if masked:
            res.apply(f"masks: {masked} Where(m, a, 0) became a · float(m)")
        bands = clip_band_masks(model)
        if bands:
            prune(model, keep)
            res.apply(f"clip bands: {bands} ReLU6-form blocks back to Clip, with one band mask per cotangent")
        for k, v in metadata(comp).items():
            model.metadata_props.add(key=k, value=v)
        if comp.opts.precision == "float16":
            from dconnx.precision import cast_model
            model = cast_model(model, onnx.TensorProto.FLOAT16, keep_io=True)
            res.apply("precision: the graph computes in float16; inputs and outputs stay float32")
        self._declared = _shapes(model.graph.output) if contracts_enabled() else None
        if comp.opts.check:
            validate(model)
            if self._declared is not None:
                self._inferred = _shapes(list(model.graph.value_info) + list(model.graph.output))
        del model.graph.value_info[:]     # onnxruntime infers them; the file stays small
        comp.result = model
        return res

    def ensures(self, comp):
        """The result passes the full checker and strict shape inference (once: the run's own
        when check=True); every output keeps its declared rank and known dims; every
        sensitivity left in the graph has its layer's rank."""
        model = comp.result
        if model is None:
            raise self.broken("no result model")
        declared = getattr(self, "_declared", None) or _shapes(model.graph.output)
        inferred = getattr(self, "_inferred", None)
        if inferred is None:
            try:
                validate(model)
            except Exception as e:
                raise self.broken(f"the result fails the checker or strict shape inference: {e}") from e
            inferred = _shapes(list(model.graph.value_info) + list(model.graph.output))
            del model.graph.value_info[:]
        for name, dims in declared.items():
            got = inferred.get(name)
            if got is None:
                raise self.broken(f"output '{name}' has no inferred shape")
            if len(got) != len(dims) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                             for a, b in zip(dims, got)):
                raise self.broken(f"output '{name}' is declared {dims} but computes {got}")
        for (rs_name, t), ct in comp.cotangents.items():
            rank = comp.view.rank(t)
            for part in ct if isinstance(ct, tuple) else (ct,):
                got = inferred.get(part) if part else None
                if got is not None and rank is not None and len(got) != rank:
                    raise self.broken(f"the {rs_name} sensitivity '{part}' at '{t}' has rank {len(got)}, "
                                      f"not {rank}")


def _shapes(value_infos) -> dict:
    """name -> dims (int, or the symbol's name) of typed tensors with a shape."""
    out = {}
    for vi in value_infos:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                            for d in tt.shape.dim]
    return out
