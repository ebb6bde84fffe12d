"""A ReLU6 back in one piece (part of optimize): Clip in the forward, one band mask in the backward.

Canonicalization writes Clip(x, 0, c) (ReLU6: c = 6) as Relu(x) − Relu(x − c) so that the
split sees two Relus. Where the converted graph needs only the pieces' masks, never their
streams (SplitGrad alone, the gradient baselines), it computes per block

    r₁ = Relu(x), r₂ = Relu(x − c), y = r₁ − r₂                        (forward)
    G·float(r₁ > 0) − G·float(r₂ > 0)                                    (each cotangent G)

which is eleven passes over the activation where the original runs one Clip fused into its
Conv. This rewrite puts back y = Clip(x, 0, c) (onnxruntime fuses it into the Conv again) and
applies one band mask b = float(0 < y < c) per cotangent: G·b. The values are those of the
canonical form except at the exact tie x = c, where the canonical form's mask is 1 and the
band's 0 (the derivative of PyTorch's ReLU6 and Hardtanh there; both are subgradients), and
the forward is the original's Clip, exact, instead of x − (x − c), which rounds for large x.

It fires only when every use of r₁, r₂ and their masks is one of these pairs: a graph that
reads the pieces' streams (SplitCAM, SplitLRP) or a mask alone keeps the canonical form.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from dconnx.graph import GraphUses

from .mask_products import _float_scalars


def _float_masks(uses: GraphUses, relu_out: str, block: onnx.NodeProto, zeros: dict):
    """The Casts of Greater(relu_out, 0) when those are relu_out's only other uses."""
    others = [u for u in uses.consumers.get(relu_out, []) if u is not block]
    if relu_out in uses.outputs or not all(u.op_type == "Greater" and u.input[0] == relu_out
                                           and u.input[1] in zeros for u in others):
        return None
    casts = []
    for gt in others:
        users = uses.only(gt.output[0], "Cast")
        if users is None:
            return None
        casts += users
    return others, casts


def _pairs(uses: GraphUses, casts1, casts2):
    """Sub(Mul(G, f₁), Mul(G, f₂)) for every Mul of the float masks, or None when one is unpaired."""
    f2 = {c.output[0] for c in casts2}
    muls2 = []
    for c in casts2:
        muls = uses.only(c.output[0], "Mul")
        if not muls:
            return None
        muls2 += muls
    pairs, seen = [], set()
    for c in casts1:
        muls = uses.only(c.output[0], "Mul")
        if muls is None:
            return None
        for a1 in muls:
            cot = a1.input[1] if a1.input[0] == c.output[0] else a1.input[0]
            subs = uses.only(a1.output[0], "Sub")
            if not subs or len(subs) != 1 or subs[0].input[0] != a1.output[0]:
                return None
            a2 = uses.producer.get(subs[0].input[1])
            if a2 is None or a2.op_type != "Mul" or id(a2) in seen or cot not in a2.input:
                return None
            mask2 = [i for i in a2.input if i != cot]
            if len(mask2) != 1 or mask2[0] not in f2 or len(uses.consumers.get(a2.output[0], [])) != 1 \
                    or a2.output[0] in uses.outputs:
                return None
            seen.add(id(a2))
            pairs.append((subs[0], cot))
    if len(seen) != len(muls2):
        return None
    return pairs


def clip_band_masks(model: onnx.ModelProto) -> int:
    """Rewrite every ReLU6-form block whose pieces only feed masked cotangent pairs; returns how many."""
    g = model.graph
    scalars = _float_scalars(g)
    zeros = {name: dtype for name, (v, dtype) in scalars.items() if v == 0.0}
    if not zeros:
        return 0
    uses = GraphUses(g)
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {v.name for v in g.input}
    position = {id(n): k for k, n in enumerate(g.node)}
    before: dict[int, list[onnx.NodeProto]] = {}
    replace: dict[int, onnx.NodeProto] = {}
    done = 0
    for block in g.node:
        if block.op_type != "Sub" or len(block.input) != 2:
            continue
        r1, r2 = (uses.producer.get(t) for t in block.input)
        if r1 is None or r2 is None or r1.op_type != "Relu" or r2.op_type != "Relu" or r1 is r2:
            continue
        shift = uses.producer.get(r2.input[0])
        x = r1.input[0]
        if shift is None or shift.op_type != "Sub" or shift.input[0] != x \
                or uses.consumers.get(shift.output[0]) != [r2] or shift.output[0] in uses.outputs:
            continue
        c = scalars.get(shift.input[1], (np.nan,))[0]
        m1 = _float_masks(uses, r1.output[0], block, zeros)
        m2 = _float_masks(uses, r2.output[0], block, zeros)
        if not c > 0 or not np.isfinite(c) or m1 is None or m2 is None or not m1[1] or len({z for gt in m1[0] + m2[0]
                                                                        for z in gt.input[1:]}) != 1:
            continue
        pairs = _pairs(uses, m1[1], m2[1])
        if pairs is None:
            continue
        zero, dtype = m1[0][0].input[1], m1[1][0]
        to = next(a.i for a in dtype.attribute if a.name == "to")
        y = block.output[0]

        def fresh(base):
            name, i = f"{y}::{base}", 0
            while name in taken:
                i += 1
                name = f"{y}::{base}{i}"
            taken.add(name)
            return name

        gt, lt, both, band = fresh("above0"), fresh("below_c"), fresh("in_band"), fresh("band")
        replace[id(block)] = helper.make_node("Clip", [x, zero, shift.input[1]], [y], name=fresh("clip"))
        band_nodes = [helper.make_node("Greater", [y, zero], [gt], name=f"{gt}#node"),
                      helper.make_node("Less", [y, shift.input[1]], [lt], name=f"{lt}#node"),
                      helper.make_node("And", [gt, lt], [both], name=f"{both}#node"),
                      helper.make_node("Cast", [both], [band], to=to, name=f"{band}#node")]
        first = min(pairs, key=lambda p: position[id(p[0])])[0]
        before.setdefault(id(first), []).extend(band_nodes)
        for sub, cot in pairs:
            replace[id(sub)] = helper.make_node("Mul", [cot, band], [sub.output[0]], name=sub.name or fresh("masked"))
        done += 1
    if done:
        nodes = []
        for n in g.node:
            nodes.extend(before.get(id(n), []))
            nodes.append(replace.get(id(n), n))
        del g.node[:]
        g.node.extend(nodes)
    return done
