"""The map's channel sum folded into the last products (part of optimize).

A map at a convolution's input is Σ_c over the sensitivity's channels, and the sensitivity is a
sum of scaled adjoint products there: SplitGrad at the image is Σ_c (s₁·|W|ᵀσ + s₂·Wᵀ∇f), with
two transposed products that each write every input channel. A sum over a product's output
channels is the product with its kernel summed over those channels,
Σ_c Conv(y, W)[c] = Conv(y, Σ_c W[c]), so each product writes one channel instead of C (three
for an RGB image) and the sums and scalings between them run on one channel. The kernel sums
are constant expressions of the weights: onnxruntime folds them when the session starts.

Only exact linear chains are rewritten: between the ReduceSum over axis 1 and the products,
Add/Sub/Sum of branches and Muls by rank-0 scalars, each intermediate read once; the products
are Conv or ConvTranspose with one group and no bias (the adjoints), whose channel axis is 1.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dconnx.ops.emitted import KERNEL_OUT_AXIS, LINEAR_COMBINATIONS

from .scalar_factors import _scalar_names


def _axes(node: onnx.NodeProto, consts: dict) -> list[int] | None:
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1] in consts:
        return [int(v) for v in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
    return None


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def fold_channel_sums(model: onnx.ModelProto) -> int:
    """Rewrite every channel ReduceSum over a linear chain of adjoint products; returns how many
    products now write one channel."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    scalars = _scalar_names(g)
    producer = {o: n for n in g.node for o in n.output if o}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            if i:
                uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in g.output}

    def leaves(t: str, found: list) -> bool:
        n = producer.get(t)
        if n is None or uses.get(t) != 1 or t in outputs:
            return False
        if n.op_type in LINEAR_COMBINATIONS:
            return all(leaves(i, found) for i in n.input)
        if n.op_type == "Mul" and len(n.input) == 2:
            k = [i for i in n.input if i not in scalars]
            return len(k) == 1 and leaves(k[0], found)
        if n.op_type in KERNEL_OUT_AXIS and _group(n) == 1 and (len(n.input) < 3 or not n.input[2]):
            found.append(n)
            return True
        return False

    before: dict[int, list[onnx.NodeProto]] = {}
    taken = set(producer) | set(consts) | {v.name for v in g.input}
    done = 0
    for r in g.node:
        if r.op_type != "ReduceSum" or _axes(r, consts) != [1]:
            continue
        found: list[onnx.NodeProto] = []
        if not leaves(r.input[0], found):
            continue
        for p in found:
            w = p.input[1]
            name, i = f"{w}::channel_sum", 0
            while name in taken:
                i += 1
                name = f"{w}::channel_sum{i}"
            taken.add(name)
            axes = f"{name}::axes"
            g.initializer.append(numpy_helper.from_array(np.asarray([KERNEL_OUT_AXIS[p.op_type]], np.int64), axes))
            before.setdefault(id(p), []).append(
                helper.make_node("ReduceSum", [w, axes], [name], keepdims=1, name=f"{name}#node"))
            p.input[1] = name
            done += 1
    if done:
        nodes = []
        for n in g.node:
            nodes.extend(before.get(id(n), []))
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
    return done
