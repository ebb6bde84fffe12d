"""Heads: turn cotangents and forward values at a layer into attribution maps.

Each requested method (dconnx/methods.py) names its rule set and its head;
the map is combined over channels to [batch, h, w], upsampled (bilinear,
half-pixel centres) to the input's spatial size and optionally normalized
per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from dconnx.errors import OptionError
from dconnx.layers import resolve_layer
from dconnx.methods import METHODS, RULESETS, parse_methods

from . import Pass, PassResult


@dataclass
class Head:
    method: str
    tensor: str       # canonical tensor of the layer
    layer: str        # how the layer was given, resolved, in words
    output: str = ""  # output name in the converted model


def plan_heads(comp) -> None:
    tensor, desc = resolve_layer(comp.view, comp.input_name, comp.opts.layer)
    comp.heads = [Head(m, tensor, desc) for m in parse_methods(comp.opts.methods)]


def rulesets_for(comp):
    """One rule set per kind that the requested methods (and exposed tensors) need."""
    names = []
    for h in comp.heads:
        rs = METHODS[h.method].ruleset
        if rs not in names:
            names.append(rs)
    if comp.opts.expose and "split" not in names:
        names.insert(0, "split")
    return [RULESETS[n](comp) for n in names]


class Heads(Pass):
    name = "heads"

    def run(self, comp) -> PassResult:
        res = PassResult(self.name)
        b = comp.b
        in_shape = comp.view.shape(comp.input_name)
        spatial = comp.spatial_shape(comp.input_name)
        for head in comp.heads:
            m = self.channel_map(comp, head)
            m = self.to_input_size(comp, m, spatial, head)
            m = self.normalize(comp, m, len(spatial))
            head.output = b.fresh(head.method, exact=True)
            b.op("Identity", [m], out=head.output, hint=f"dc/{head.method}")
            out_spatial = spatial if comp.opts.upsample else comp.spatial_shape(head.tensor)
            comp.new_outputs.append(onnx.helper.make_tensor_value_info(
                head.output, comp.float_type, [in_shape[0]] + list(out_spatial)))
            res.apply(f"{head.method} at {head.layer}")
        for spec, t in comp.exposed():
            self.expose(comp, t, str(spec))
        for spec, t in comp.collected():
            for h in comp.heads:
                rs = comp.rulesets[METHODS[h.method].ruleset]
                ct = comp.cotangents.get((rs.name, t))
                if ct is None:
                    raise OptionError(f"collect layer {spec} is not below the injection layer")
                out = b.fresh(f"{h.method}@{spec}", exact=True)
                b.op("Identity", [rs.vector(ct)], out=out)
                comp.new_outputs.append(onnx.helper.make_tensor_value_info(out, comp.float_type,
                                                                           comp.view.shape(t)))
        return res

    def ensures(self, comp):
        """Every requested map is an output of its declared shape ([batch, *spatial]), produced
        by a node; so is every exposed or collected tensor."""
        produced = {o for n in comp.b.nodes for o in n.output}
        declared = {vi.name: vi for vi in comp.new_outputs}
        n_spatial = len(comp.spatial_shape(comp.input_name))
        for head in comp.heads:
            vi = declared.get(head.output)
            if not head.output or vi is None:
                raise self.broken(f"no output for {head.method} at {head.layer}")
            rank = len(vi.type.tensor_type.shape.dim)
            if rank != 1 + n_spatial:
                raise self.broken(f"output '{head.output}' is declared with rank {rank}, not "
                                  f"{1 + n_spatial} ([batch, *spatial])")
        for name in declared:
            if name not in produced:
                raise self.broken(f"output '{name}' is produced by no node")

    def channel_map(self, comp, head: Head) -> str:
        method = METHODS[head.method]
        rs = comp.rulesets[method.ruleset]
        ct = comp.cotangents.get((rs.name, head.tensor))
        if ct is None:
            raise OptionError(f"the layer {head.layer} does not influence the explained output")
        m = method.head(comp, head.tensor, rs, ct)
        if method.reduce == "sum":
            m = comp.b.reduce_sum(m, [comp.channel_axis_of(head.tensor)], keepdims=0,
                                  hint=f"dc/{head.method}_sum")
        return m

    def to_input_size(self, comp, m: str, spatial: list, head: Head) -> str:
        """The [batch, *layer spatial] map resized (bilinear) to the input's spatial size."""
        b = comp.b
        layer_spatial = comp.spatial_shape(head.tensor)
        if len(layer_spatial) != len(spatial):
            raise OptionError(f"the layer {head.layer} has no spatial axes like the input's {spatial}; "
                              "choose a convolutional layer")
        if list(layer_spatial) == list(spatial) or not comp.opts.upsample:
            return m
        x4 = b.unsqueeze(m, [1])
        sizes = b.concat([b.shape_of(x4, 0, 2), b.ints(spatial)], axis=0)
        up = b.op("Resize", [x4, "", "", sizes], mode="linear",
                  coordinate_transformation_mode="half_pixel", hint="dc/upsample")
        return b.squeeze(up, [1])

    def normalize(self, comp, m: str, n_spatial: int) -> str:
        b = comp.b
        mode = comp.opts.normalize
        if mode == "none":
            return m
        tiny = b.scalar(np.finfo(b.float_dtype).tiny)
        axes = list(range(1, 1 + n_spatial))
        if mode == "max":
            scale = b.reduce("ReduceMax", b.abs(m), axes, keepdims=1)
            return b.div(m, b.add(scale, tiny), hint="dc/normalized")
        lo = b.reduce("ReduceMin", m, axes, keepdims=1)
        hi = b.reduce("ReduceMax", m, axes, keepdims=1)
        return b.div(b.sub(m, lo), b.add(b.sub(hi, lo), tiny), hint="dc/normalized")

    def expose(self, comp, t: str, prefix: str) -> None:
        """Streams and the four sensitivities of tensor t as extra outputs (for tests)."""
        b = comp.b
        shape = comp.view.shape(t)
        sp = comp.stream(t)
        items = [("p", sp.p), ("n", sp.n)]
        ct = comp.cotangents.get(("split", t))
        if ct is not None:
            items += list(zip(("dpp", "dnp", "dpn", "dnn"), comp.rulesets["split"].four(ct)))
        ct = comp.cotangents.get(("splitlrp", t))
        if ct is not None:
            for part, name in zip(ct, ("Rp", "Rn")):
                items.append((name, part if part is not None else b.zeros_like(t)))
        for suffix, tensor in items:
            out = b.fresh(f"{prefix}::{suffix}", exact=True)
            b.op("Identity", [tensor], out=out)
            comp.new_outputs.append(onnx.helper.make_tensor_value_info(out, comp.float_type, shape))


__all__ = ["Heads", "Head", "parse_methods", "plan_heads"]
