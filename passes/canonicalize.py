"""Canonicalize: rewrite an exported graph into the canonical op set.

Each rewrite has a name; when it cannot apply to a node it says why (in the
PassResult's `skipped`). The canonical graph is what shift points,
recentering points and layer indices are counted on, so two exporters of one
model give the same maps (docs/method.md §1).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dconnx.errors import InvalidModelError, UnsupportedOpError
from dconnx.graph import ModelView
from dconnx.io import MAX_OPSET, MIN_OPSET, infer_shapes
from dconnx.ir import attrs, node_label
from dconnx.ops import (ABSORBS_BATCHNORM, AUTO_PAD_OPS, EXPLAINS_INPUT, NONDETERMINISTIC,
                        SUPPORTED, WINDOW_POOLS, rewritten_by)

from . import Pass, PassResult


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


class _Graph:
    """Mutable editing helpers over model.graph with fresh-name support."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.view = ModelView(model)
        self._taken = {n for node in self.g.node for n in list(node.input) + list(node.output)}
        self._taken |= {t.name for t in self.g.initializer} | {i.name for i in self.g.input}
        self._taken |= {node.name for node in self.g.node}
        self._n = 0

    def fresh(self, base: str) -> str:
        while True:
            self._n += 1
            name = f"{base}__c{self._n}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer (and graph output) read `new` instead of `old`."""
        for node in self.g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for out in self.g.output:
            if out.name == old:
                # keep the graph output's name: rename the producer of `new` instead
                prod = next((n for n in self.g.node if new in n.output), None)
                if prod is not None and new not in {i.name for i in self.g.input}:
                    prod.output[list(prod.output).index(new)] = old
                    for node in self.g.node:
                        for i, name in enumerate(node.input):
                            if name == new:
                                node.input[i] = old
                else:
                    self.g.node.append(helper.make_node("Identity", [new], [old],
                                                        name=self.fresh("keep_output")))

    def refresh(self):
        infer_shapes(self.model)
        self.view = ModelView(self.model)


def _dead_code(model: onnx.ModelProto) -> int:
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(reversed(keep))
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in needed:
            del g.initializer[i]
    return removed


class Canonicalize(Pass):
    name = "canonicalize"

    def requires(self, comp):
        op = _opset(comp.model)
        if op > MAX_OPSET:
            raise InvalidModelError(f"opset {op} is newer than the supported {MAX_OPSET}")

    def run(self, comp) -> PassResult:
        res = PassResult(self.name)
        self.fold_bn = comp.opts.fold_batchnorm
        model = comp.model
        if _opset(model) < MIN_OPSET:
            from onnx import version_converter
            from dconnx.ops.resample import keep_legacy_resize_coordinates
            old = _opset(model)
            before = model
            try:
                model = version_converter.convert_version(model, MIN_OPSET)
            except Exception as e:
                raise InvalidModelError(f"cannot upgrade opset {old} to {MIN_OPSET}: {e}") from e
            keep_legacy_resize_coordinates(before, model, old)
            res.apply(f"upgrade_opset: {old} -> {MIN_OPSET}")
        ed = _Graph(model)
        self.constants_to_initializers(ed, res)
        ed.refresh()
        ed = self.unify_float_types(ed, res)
        # shapes become static stage by stage (a folded chunk makes the next Shape static)
        for _ in range(64):
            before = len(res.applied)
            for rewrite in (self.fold_constants, self.fold_shape_arithmetic, self.static_reshape):
                rewrite(ed, res)
                ed.refresh()
            if len(res.applied) == before:
                break
        for rewrite in (self.remove_identity, self.strip_softmax, self.flatten_to_reshape,
                        self.reduce_mean_to_gap, self.div_to_mul, self.gemm_normalize,
                        self.matmul_add_to_gemm, self.fold_batchnorm, self.clip_to_relu,
                        self.max_to_relu, self.selection_to_relu, self.leaky_to_relu, self.expand_activation,
                        self.explicit_pads,
                        self.row_major_maxpool):
            rewrite(ed, res)
            ed.refresh()
        model = ed.model
        removed = _dead_code(model)
        if removed:
            res.apply(f"dead_code: removed {removed} nodes")
        infer_shapes(model)   # fresh value_info: what the exporter wrote may be stale
        comp.model = model
        comp.refresh()
        from .preflight import check_final
        check_final(comp)
        return res

    def ensures(self, comp):
        """Only canonical ops compute float tensors from data (a Softmax kept for the output
        aside; integer arithmetic on a data tensor's Shape, e.g. the sizes of a Resize, is never
        split), and every such tensor has a static shape but for the batch axis."""
        view = comp.view
        from .preflight import fused_nodes
        inner = fused_nodes(view)      # inner nodes of an activation exported as a subgraph
        for node in comp.model.graph.node:
            if not any(i in view.data_tensors for i in node.input) or (node.name or node.output[0]) in inner:
                continue
            outs = [o for o in node.output if o and o in view.data_tensors and view.is_float(o)]
            if not outs:
                continue
            if node.op_type not in SUPPORTED and node.op_type not in EXPLAINS_INPUT:
                raise self.broken(f"{node_label(node)} ({node.op_type}) survived canonicalization")
            for o in outs:
                shape = view.shape(o)
                if shape is None or any(not isinstance(d, int) for d in shape[1:]):
                    raise self.broken(f"{node_label(node)}: output '{o}' has shape {shape}, not static "
                                      "but for the batch axis")

    # -- rewrites ----------------------------------------------------------
    def unify_float_types(self, ed: _Graph, res: PassResult) -> _Graph:
        """A model that mixes float types (a float16 body between float32 inputs and outputs, a
        float64 head, a round trip through another type) is explained in its data input's float
        type throughout: each Cast between float types becomes one to that type (then removed as
        the identity it is on values: its gradient is the identity too), other-typed initializers
        are converted, float outputs declared in that type (dconnx/precision.py). Celu, defined
        for float32 only, is expanded in its own type first."""
        from dconnx.precision import cast_model, float_type_of, foreign_float_types, type_name
        to_type = float_type_of(ed.model)
        retyped = foreign_float_types(ed.model, to_type)
        if not retyped:
            return ed
        self.expand_activation(ed, res)
        to = type_name(to_type)
        res.apply(f"unify_float_types: the graph computes in its input's type, {to}; "
                  f"retyped {len(retyped)}: " + "; ".join(retyped[:6]) + ("; ..." if len(retyped) > 6 else ""))
        res.notes.append(f"the model mixes float types: it is explained in {to} throughout (a Cast "
                         "between float types is the identity on values, as its gradient is), so its "
                         "logits can differ from the original's by the other types' rounding")
        ed = _Graph(cast_model(ed.model, to_type))
        ed.refresh()
        return ed

    def constants_to_initializers(self, ed: _Graph, res: PassResult):
        for node in list(ed.g.node):
            if node.op_type == "Constant":
                val = ed.view.const(node.output[0])
                if val is None:
                    res.skip(f"constants_to_initializers: {node_label(node)} — sparse or unknown value")
                    continue
                ed.g.initializer.append(numpy_helper.from_array(val, node.output[0]))
                ed.g.node.remove(node)
                res.apply(f"constants_to_initializers: {node_label(node)}")

    def fold_constants(self, ed: _Graph, res: PassResult):
        """Evaluate nodes whose inputs are all constants (shape subgraphs of static shapes too)."""
        from onnx.reference import ReferenceEvaluator
        view = ed.view
        known = {t.name for t in ed.g.initializer}
        for node in list(ed.g.node):
            ins = [i for i in node.input if i]
            if node.op_type == "Shape" and ins and view.static_shape(ins[0], allow_batch=False):
                shape = np.asarray(view.shape(ins[0]), dtype=np.int64)
                a = attrs(node)
                shape = shape[a.get("start", 0):a.get("end", len(shape))]
                ed.g.initializer.append(numpy_helper.from_array(shape, node.output[0]))
                known.add(node.output[0])
                ed.g.node.remove(node)
                res.apply(f"fold_constants: {node_label(node)} (static shape)")
                continue
            if not ins or not all(i in known for i in ins) or node.op_type in NONDETERMINISTIC:
                continue
            inits = {t.name: t for t in ed.g.initializer if t.name in ins}
            sub = helper.make_graph(
                [node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output if o],
                initializer=list(inits.values()))
            sub_model = helper.make_model(sub, opset_imports=list(ed.model.opset_import),
                                          ir_version=ed.model.ir_version)
            try:
                outs = ReferenceEvaluator(sub_model).run(None, {})
            except Exception as e:
                res.skip(f"fold_constants: {node_label(node)} — {type(e).__name__}: {e}")
                continue
            for name, val in zip([o for o in node.output if o], outs):
                ed.g.initializer.append(numpy_helper.from_array(np.asarray(val), name))
                known.add(name)
            ed.g.node.remove(node)
            res.apply(f"fold_constants: {node_label(node)} ({node.op_type})")

    def fold_shape_arithmetic(self, ed: _Graph, res: PassResult):
        """Integer arithmetic on the Shape of data tensors whose non-batch dims are static
        (the channel split of a chunk, say): evaluated for two batch sizes, every result that
        does not depend on the batch becomes a constant."""
        view = ed.view
        known = {t.name: numpy_helper.to_array(t) for t in ed.g.initializer
                 if int(np.prod(t.dims)) <= 64}
        vals: dict[str, tuple] = {}
        producers = {}
        for node in ed.g.node:
            ins = [i for i in node.input if i]
            if node.op_type == "Shape" and ins and view.static_shape(ins[0]) is not None:
                shape = view.shape(ins[0])
                a = attrs(node)
                pair = tuple(np.asarray([batch] + list(shape[1:]), dtype=np.int64)
                             [a.get("start", 0):a.get("end", len(shape))] for batch in (2, 3))
                vals[node.output[0]] = pair
                producers[node.output[0]] = node
                continue
            if not ins or not any(i in vals for i in ins) or not all(i in vals or i in known for i in ins):
                continue
            outs = [_eval_node(ed, node, {i: (vals[i][k] if i in vals else known[i]) for i in ins})
                    for k in (0, 1)]
            if outs[0] is None or outs[1] is None:
                res.skip(f"fold_shape_arithmetic: {node_label(node)} — cannot evaluate")
                continue
            for o, v2, v3 in zip([o for o in node.output if o], outs[0], outs[1]):
                vals[o] = (v2, v3)
                producers[o] = node
        consumers_outside = {i for node in ed.g.node for i in node.input
                             if i in vals and all(o not in vals for o in node.output if o)}
        consumers_outside |= {o.name for o in ed.g.output if o.name in vals}
        for name in sorted(consumers_outside):
            v2, v3 = vals[name]
            if v2.shape == v3.shape and np.array_equal(v2, v3):
                node = producers[name]
                idx = list(node.output).index(name)
                node.output[idx] = ed.fresh(f"{name}_unused")
                ed.g.initializer.append(numpy_helper.from_array(np.asarray(v2), name))
                res.apply(f"fold_shape_arithmetic: '{name}' = {np.asarray(v2).tolist()}")

    def remove_identity(self, ed: _Graph, res: PassResult):
        """Identity, Dropout, and pooling with 1×1 windows, stride 1 and no padding (VGG's
        adaptive pool at 224×224 exports as one) — which would otherwise count as an op."""
        for node in list(ed.g.node):
            if node.op_type in WINDOW_POOLS and _is_identity_pool(node):
                if len(node.output) > 1 and node.output[1]:
                    continue
            elif node.op_type in rewritten_by("remove_same_type_cast"):
                to, src_type = attrs(node).get("to"), ed.view.dtypes.get(node.input[0])
                if not ed.view.is_data(node.input[0]) or to != src_type:
                    continue       # integer shape arithmetic (float types are unified first)
            elif node.op_type not in rewritten_by("remove_identity"):
                continue
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and \
                    ed.view.consumers.get(node.output[1]):
                res.skip(f"remove_identity: {node_label(node)} — its mask output is used")
                continue
            src, dst = node.input[0], node.output[0]
            ed.g.node.remove(node)
            ed.replace_uses(dst, src)
            res.apply(f"remove_identity: {node_label(node)} ({node.op_type})")

    def strip_softmax(self, ed: _Graph, res: PassResult):
        outs = {o.name for o in ed.g.output}
        for node in ed.g.node:
            if node.op_type in EXPLAINS_INPUT and node.output[0] in outs:
                res.notes.append(f"explaining the logits '{node.input[0]}' that feed "
                                 f"{node.op_type} '{node_label(node)}' (output '{node.output[0]}')")
                res.apply(f"strip_softmax: {node_label(node)} kept for its output, not explained")

    def static_reshape(self, ed: _Graph, res: PassResult):
        """Reshape whose target comes from shape arithmetic: a constant target."""
        view = ed.view
        for node in ed.g.node:
            if node.op_type != "Reshape" or view.const(node.input[1]) is not None:
                continue
            x, y = node.input[0], node.output[0]
            xs, ys = view.shape(x), view.shape(y)
            if ys is not None and xs is not None and ys[0] == xs[0] and \
                    all(isinstance(d, int) for d in xs[1:]):
                unknown = [i for i, d in enumerate(ys[1:], 1) if not isinstance(d, int)]
                if len(unknown) == 1:   # the one free dim follows from the element count
                    known = int(np.prod([d for d in ys[1:] if isinstance(d, int)]))
                    total = int(np.prod(xs[1:]))
                    if known and total % known == 0:
                        ys = list(ys)
                        ys[unknown[0]] = total // known
            if ys is None or xs is None or any(not isinstance(d, int) for d in ys[1:]):
                res.skip(f"static_reshape: {node_label(node)} — output shape {ys} is not static")
                continue
            if not isinstance(ys[0], int) and ys[0] != xs[0]:
                res.skip(f"static_reshape: {node_label(node)} — batch dim changes")
                continue
            node.input[1] = ed.add_init(np.asarray([-1] + ys[1:], dtype=np.int64), f"{y}_shape")
            _set_attr(node, "allowzero", 0)
            res.apply(f"static_reshape: {node_label(node)}")

    def flatten_to_reshape(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in ed.g.node:
            if node.op_type != "Flatten":
                continue
            shape = view.shape(node.output[0])
            # 0 copies the batch dim, so shape inference keeps its symbol
            shp = ed.add_init(np.asarray([0, shape[1]], dtype=np.int64), f"{node.output[0]}_shape")
            _rebuild(node, "Reshape", [node.input[0], shp], {})
            res.apply(f"flatten_to_reshape: {node_label(node)}")

    def reduce_mean_to_gap(self, ed: _Graph, res: PassResult):
        """A mean over all spatial axes is a GlobalAveragePool (+ Reshape without keepdims);
        any other mean stays a ReduceMean (one op, so one ε-rule in LRP)."""
        view = ed.view
        for node in list(ed.g.node):
            if node.op_type != "ReduceMean" or not view.is_data(node.input[0]):
                continue
            a = attrs(node)
            x, y = node.input[0], node.output[0]
            rank = view.rank(x)
            axes = view.reduce_axes(node)
            keep = int(a.get("keepdims", 1))
            if axes == list(range(2, rank)):
                if keep:
                    _rebuild(node, "GlobalAveragePool", [x], {})
                else:
                    pooled = ed.fresh(f"{y}_gap")
                    idx = list(ed.g.node).index(node)
                    ed.g.node.insert(idx, helper.make_node("GlobalAveragePool", [x], [pooled],
                                                           name=ed.fresh(f"{node.name}_gap")))
                    shape = ed.add_init(np.asarray([0] + view.shape(y)[1:], dtype=np.int64), f"{y}_shape")
                    _rebuild(node, "Reshape", [pooled, shape], {})
                res.apply(f"reduce_mean_to_gap: {node_label(node)}")
                continue
            res.skip(f"reduce_mean_to_gap: {node_label(node)} — axes {axes} are not all spatial axes: "
                     "kept as a ReduceMean")

    def div_to_mul(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in ed.g.node:
            if node.op_type == "Div" and view.is_data(node.input[0]):
                c = view.const(node.input[1])
                if c is None:
                    continue
                node.input[1] = ed.add_init((1.0 / c).astype(c.dtype), f"{node.input[1]}_recip")
                _rebuild(node, "Mul", list(node.input), {})
                res.apply(f"div_to_mul: {node_label(node)}")

    def gemm_normalize(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in ed.g.node:
            if node.op_type != "Gemm":
                continue
            a = attrs(node)
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            if alpha != 1.0:
                w = view.const(node.input[1])
                node.input[1] = ed.add_init((w * alpha).astype(w.dtype), f"{node.input[1]}_scaled")
                _set_attr(node, "alpha", 1.0)
                res.apply(f"gemm_normalize: {node_label(node)} alpha folded")
            if beta != 1.0 and len(node.input) > 2 and node.input[2]:
                c = view.const(node.input[2])
                node.input[2] = ed.add_init((c * beta).astype(c.dtype), f"{node.input[2]}_scaled")
                _set_attr(node, "beta", 1.0)
                res.apply(f"gemm_normalize: {node_label(node)} beta folded")

    def matmul_add_to_gemm(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in list(ed.g.node):
            if node.op_type != "MatMul" or not view.is_data(node.input[0]):
                continue
            if view.rank(node.input[0]) != 2:
                res.skip(f"matmul_add_to_gemm: {node_label(node)} — input is not 2-D")
                continue
            users = view.consumers.get(node.output[0], [])
            bias = None
            if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in view.output_names:
                add = users[0]
                other = [i for i in add.input if i != node.output[0]]
                c = view.const(other[0]) if other else None
                if c is not None and c.size == view.shape(node.output[0])[1]:
                    bias = (add, other[0])
            if bias is None:
                _rebuild(node, "Gemm", list(node.input), {})
                res.apply(f"matmul_add_to_gemm: {node_label(node)} (no bias)")
                continue
            add, b = bias
            ed.g.node.remove(add)
            node.input.append(b)
            y = add.output[0]
            node.output[0] = y
            _rebuild(node, "Gemm", list(node.input), {})
            res.apply(f"matmul_add_to_gemm: {node_label(node)} + {node_label(add)}")

    def fold_batchnorm(self, ed: _Graph, res: PassResult):
        view = ed.view
        for bn in list(ed.g.node):
            if bn.op_type != "BatchNormalization":
                continue
            if not self.fold_bn:
                res.skip(f"fold_batchnorm: {node_label(bn)} — disabled (fold_batchnorm=False)")
                continue
            x = bn.input[0]
            prod = view.producer.get(x)
            why = None
            if prod is None or prod.op_type not in ABSORBS_BATCHNORM:
                why = "not preceded by a Conv or Gemm"
            elif len(view.consumers.get(x, [])) != 1 or x in view.output_names:
                why = "the Conv/Gemm output has other uses"
            if why is None and any(view.const(i) is None for i in prod.input[1:] if i):
                why = "the Conv/Gemm parameters are not constants"
            if why is None and any(view.const(i) is None for i in bn.input[1:5]):
                why = "the BatchNormalization parameters are not constants"
            if why:
                res.skip(f"fold_batchnorm: {node_label(bn)} — {why}")
                continue
            gamma, beta, mean, var = (view.const(i).astype(np.float64) for i in bn.input[1:5])
            eps = float(attrs(bn).get("epsilon", 1e-5))
            s = gamma / np.sqrt(var + eps)
            w = view.const(prod.input[1])
            dt = w.dtype
            w64 = w.astype(np.float64)
            has_b = len(prod.input) > 2 and prod.input[2]
            b = view.const(prod.input[2]).astype(np.float64) if has_b else np.zeros(len(s))
            if prod.op_type == "Conv":
                w_new = w64 * s.reshape([-1] + [1] * (w.ndim - 1))
            elif int(attrs(prod).get("transB", 0)):
                w_new = w64 * s[:, None]
            else:
                w_new = w64 * s[None, :]
            b_new = (b.reshape(-1) - mean) * s + beta
            wname = ed.add_init(w_new.astype(dt), f"{prod.input[1]}_bnfold")
            bname = ed.add_init(b_new.astype(dt), f"{bn.output[0]}_bnfold_bias")
            prod.input[1] = wname
            if has_b:
                prod.input[2] = bname
            else:
                if len(prod.input) < 3:
                    prod.input.append(bname)
                else:
                    prod.input[2] = bname
            ed.g.node.remove(bn)
            prod.output[0] = bn.output[0]
            res.apply(f"fold_batchnorm: {node_label(bn)} into {node_label(prod)}")

    def clip_to_relu(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in list(ed.g.node):
            if node.op_type != "Clip" or not view.is_data(node.input[0]):
                continue
            a = attrs(node)
            lo = a.get("min")
            hi = a.get("max")
            if len(node.input) > 1 and node.input[1]:
                lo = float(view.const(node.input[1]))
            if len(node.input) > 2 and node.input[2]:
                hi = float(view.const(node.input[2]))
            x, y = node.input[0], node.output[0]
            dtype = ed.view.dtypes.get(x, 1)
            npdt = helper.tensor_dtype_to_np_dtype(dtype)
            new = []
            if lo is None or not np.isfinite(lo):
                raise UnsupportedOpError([(node_label(node), "Clip",
                                           "a Clip without a lower bound is not a ReLU form")])
            base = x
            if lo != 0.0:
                base = ed.fresh(f"{y}_shift")
                new.append(helper.make_node("Sub", [x, ed.add_init(np.asarray(lo, npdt), f"{y}_lo")],
                                            [base], name=ed.fresh(f"{node.name}_sublo")))
            r1 = ed.fresh(f"{y}_relu_lo") if (hi is not None or lo != 0.0) else y
            new.append(helper.make_node("Relu", [base], [r1], name=ed.fresh(f"{node.name}_relu")))
            last = r1
            if hi is not None and np.isfinite(hi):
                xs = ed.fresh(f"{y}_shift_hi")
                new.append(helper.make_node("Sub", [x, ed.add_init(np.asarray(hi, npdt), f"{y}_hi")],
                                            [xs], name=ed.fresh(f"{node.name}_subhi")))
                r2 = ed.fresh(f"{y}_relu_hi")
                new.append(helper.make_node("Relu", [xs], [r2], name=ed.fresh(f"{node.name}_relu_hi")))
                out = ed.fresh(f"{y}_diff") if lo != 0.0 else y
                new.append(helper.make_node("Sub", [r1, r2], [out], name=ed.fresh(f"{node.name}_diff")))
                last = out
            if lo != 0.0:
                new.append(helper.make_node("Add", [last, ed.add_init(np.asarray(lo, npdt), f"{y}_lo2")],
                                            [y], name=ed.fresh(f"{node.name}_addlo")))
            _splice(ed, node, new)
            res.apply(f"clip_to_relu: {node_label(node)} (min={lo}, max={hi})")

    def max_to_relu(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in ed.g.node:
            if node.op_type == "Max" and len(node.input) == 2:
                data = [i for i in node.input if view.is_data(i)]
                other = [i for i in node.input if i not in data]
                const = view.const(other[0]) if len(data) == 1 else None
                if const is not None and not np.any(const):
                    _rebuild(node, "Relu", data, {})
                    res.apply(f"max_to_relu: {node_label(node)}")

    def selection_to_relu(self, ed: _Graph, res: PassResult):
        """Max/Min of data tensors, Abs, Neg, Sum/Mean, GlobalMaxPool, ReduceMax/ReduceMin: the
        exact rewrites of dconnx/ops/selection.py (into Relu, Add/Sub, affine ops and MaxPool)."""
        from dconnx.ops.selection import rewrite_node
        ops = rewritten_by("selection_to_relu")
        for node in list(ed.g.node):
            if node.op_type not in ops or not any(ed.view.is_data(i) for i in node.input if i):
                continue
            new = rewrite_node(ed.view, node, ed.fresh, ed.add_init)
            if new is not None:
                _splice(ed, node, new)
                res.apply(f"selection_to_relu: {node_label(node)} ({node.op_type})")

    def expand_activation(self, ed: _Graph, res: PassResult):
        """Celu and Mish into ops with kernels on every provider (dconnx/ops/smooth.py)."""
        from dconnx.ops.smooth import expand_node
        for node in list(ed.g.node):
            if node.op_type in rewritten_by("expand_activation") and ed.view.is_data(node.input[0]):
                _splice(ed, node, expand_node(ed.view, node, ed.fresh, ed.add_init))
                res.apply(f"expand_activation: {node_label(node)} ({node.op_type})")

    def leaky_to_relu(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in list(ed.g.node):
            if node.op_type not in rewritten_by("leaky_to_relu") or not view.is_data(node.input[0]):
                continue
            x, y = node.input[0], node.output[0]
            npdt = helper.tensor_dtype_to_np_dtype(view.dtypes.get(x, 1))
            if node.op_type == "LeakyRelu":
                slope = np.asarray(float(attrs(node).get("alpha", 0.01)), npdt)
            else:
                slope = view.const(node.input[1]).astype(npdt)
            r, lin_part, rel_part = ed.fresh(f"{y}_relu"), ed.fresh(f"{y}_lin"), ed.fresh(f"{y}_rel")
            new = [
                helper.make_node("Relu", [x], [r], name=ed.fresh(f"{node.name}_relu")),
                helper.make_node("Mul", [x, ed.add_init(slope, f"{y}_slope")], [lin_part],
                                 name=ed.fresh(f"{node.name}_lin")),
                helper.make_node("Mul", [r, ed.add_init((1 - slope).astype(npdt), f"{y}_oneminus")],
                                 [rel_part], name=ed.fresh(f"{node.name}_rel")),
                helper.make_node("Add", [lin_part, rel_part], [y], name=ed.fresh(f"{node.name}_sum")),
            ]
            _splice(ed, node, new)
            res.apply(f"leaky_to_relu: {node_label(node)}")

    def explicit_pads(self, ed: _Graph, res: PassResult):
        view = ed.view
        for node in ed.g.node:
            if node.op_type not in AUTO_PAD_OPS:
                continue
            a = attrs(node)
            mode = a.get("auto_pad", "NOTSET")
            if mode in ("NOTSET", ""):
                continue
            xs = view.shape(node.input[0])
            k = a.get("kernel_shape") or view.shape(node.input[1])[2:]
            nd = len(k)
            s = a.get("strides", [1] * nd)
            d = a.get("dilations", [1] * nd)
            pads = [0] * (2 * nd)
            if mode != "VALID":
                for i in range(nd):
                    size = xs[2 + i]
                    out = -(-size // s[i])
                    total = max(0, (out - 1) * s[i] + d[i] * (k[i] - 1) + 1 - size)
                    small, big = total // 2, total - total // 2
                    pads[i], pads[nd + i] = (small, big) if mode == "SAME_UPPER" else (big, small)
            _set_attr(node, "auto_pad", "NOTSET")
            _set_attr(node, "pads", pads)
            res.apply(f"explicit_pads: {node_label(node)} ({mode})")


    def row_major_maxpool(self, ed: _Graph, res: PassResult):
        """storage_order only sets the layout of MaxPool's Indices output; the backward routes
        through row-major indices of its own, so an unused Indices output is dropped with it
        (preflight refused the case where the graph reads column-major indices)."""
        for node in ed.g.node:
            if node.op_type != "MaxPool" or not int(attrs(node).get("storage_order", 0)):
                continue
            for a in [a for a in node.attribute if a.name == "storage_order"]:
                node.attribute.remove(a)
            del node.output[1:]
            res.apply(f"row_major_maxpool: {node_label(node)} (its Indices output was unused)")


def _eval_node(ed: _Graph, node, feeds: dict):
    """Run one node with onnx.reference on concrete inputs; None if it cannot."""
    from onnx.reference import ReferenceEvaluator
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in feeds.items()]
    outs = [o for o in node.output if o]
    g = helper.make_graph([node], "eval", [], [helper.make_tensor_value_info(o, 0, None) for o in outs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=list(ed.model.opset_import), ir_version=ed.model.ir_version)
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(m).run(None, {})]
    except Exception:
        return None


def _is_identity_pool(node) -> bool:
    a = attrs(node)
    k = list(a.get("kernel_shape", []))
    nd = len(k)
    return bool(k) and k == [1] * nd and list(a.get("strides", [1] * nd)) == [1] * nd and \
        not any(a.get("pads", [0] * (2 * nd))) and a.get("auto_pad", "NOTSET") in ("NOTSET", "", "VALID")


def _set_attr(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _rebuild(node, op_type, inputs, attributes):
    node.op_type = op_type
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]
    for k, v in attributes.items():
        node.attribute.append(helper.make_attribute(k, v))


def _splice(ed: _Graph, node, new_nodes):
    idx = list(ed.g.node).index(node)
    ed.g.node.remove(node)
    for j, n in enumerate(new_nodes):
        ed.g.node.insert(idx + j, n)
