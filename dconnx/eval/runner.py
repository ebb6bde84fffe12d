"""Running attributions for the metrics: one original model, converted by dconnx per
layer (and per injection point), every map computed by ONNX Runtime."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..api import compile_model
from ..errors import OptionError
from ..io import load_model
from ..methods import METHODS, parse_methods
from ..ops import EXPLAINS_INPUT
from ..runtime import Explainer, make_session
from .metrics import softmax


def alpha_methods(methods) -> tuple[str, ...]:
    """The methods whose maps depend on the run-time α (SplitGrad, SplitCAM)."""
    return tuple(m for m in methods if "alpha" in METHODS[m].params)


@dataclass
class ChainLayer:
    index: int
    op_type: str
    tensor: str
    shape: list


def chain_layers(model: onnx.ModelProto) -> list[ChainLayer]:
    """The feature chain of the canonical graph (what `dconnx layers` prints): layer index
    N names the tensor entering op N."""
    from dconnx.passes.canonicalize import Canonicalize
    from dconnx.passes.preflight import Preflight

    from ..compilation import Compilation, Options
    from ..layers import feature_chain
    comp = Compilation(load_model(model), Options())
    Preflight()(comp)
    Canonicalize()(comp)
    inp = comp.view.data_inputs[0].name
    return [ChainLayer(op.index, op.op_type, op.tensor_in, list(comp.view.shape(op.tensor_in)))
            for op in feature_chain(comp.view, inp)]


def _logits_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its first output moved before a trailing Softmax/LogSoftmax (the
    maps explain logits; predictions take the softmax of these)."""
    out = model.graph.output[0].name
    producer = next((n for n in model.graph.node if out in n.output), None)
    if producer is None or producer.op_type not in EXPLAINS_INPUT:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    elem = m.graph.output[0].type.tensor_type.elem_type
    m.graph.output.insert(0, onnx.helper.make_tensor_value_info(producer.input[0], elem, None))
    return m


class Attributor:
    """Attribution maps, logits and injected relevance vectors of one model, through
    dconnx-converted models run by ONNX Runtime.

    ``convert_options`` are passed to every `dconnx.convert` (e.g. ``mean``/``std`` for
    LRP-γ's input bounds, ``maxpool``); converted models are cached per
    (methods, layer, injection)."""

    def __init__(self, model, *, threads: int | None = None, providers=None, batch_size: int = 64,
                 convert_options: dict | None = None):
        self.model = load_model(model)
        self.threads = threads
        self.providers = providers
        self.batch_size = int(batch_size)
        self.convert_options = dict(convert_options or {})
        self._explainers: dict = {}
        self._forward = None
        self.input_name = self.model.graph.input[0].name
        dims = self.model.graph.input[0].type.tensor_type.shape.dim
        self.input_shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        self.n_classes = None

    # -- construction ----------------------------------------------------
    def with_model(self, model: onnx.ModelProto) -> "Attributor":
        """The same settings for another model (e.g. a randomized copy)."""
        return Attributor(model, threads=self.threads, providers=self.providers,
                          batch_size=self.batch_size, convert_options=self.convert_options)

    def explainer(self, methods, layer=None, *, inject=None, collect=()) -> Explainer:
        methods = parse_methods(methods)
        key = (methods, None if layer is None else str(layer), inject, tuple(collect))
        if key not in self._explainers:
            opts = dict(self.convert_options)
            if inject is not None:
                opts.update(inject=inject, collect=tuple(collect))
            converted, _ = compile_model(self.model, methods=methods, layer=layer, **opts)
            self._explainers[key] = Explainer(converted, providers=self.providers, threads=self.threads)
        return self._explainers[key]

    # -- running ---------------------------------------------------------
    def logits(self, x) -> np.ndarray:
        if self._forward is None:
            self._forward = make_session(_logits_model(self.model), self.providers, threads=self.threads)
        x = np.asarray(x, dtype=np.float32)
        outs = [self._forward.run(None, {self.input_name: x[s:s + self.batch_size]})[0]
                for s in range(0, x.shape[0], self.batch_size)]
        logits = np.concatenate(outs).reshape(x.shape[0], -1)
        self.n_classes = logits.shape[1]
        return logits

    def predict(self, x) -> np.ndarray:
        """Softmax probabilities (Quantus' ``softmax=True`` for Pixel Flipping/Selectivity)."""
        return softmax(self.logits(x))

    def maps(self, x, y, methods, layer=None, alpha=None) -> dict[str, np.ndarray]:
        """{method: [N, H, W]} for targets ``y`` (None: the argmax) at ``layer`` and ``alpha``
        (used by SplitGrad/SplitCAM only)."""
        methods = parse_methods(methods)
        ex = self.explainer(methods, layer)
        x = np.asarray(x, dtype=np.float32)
        parts: dict[str, list] = {m: [] for m in methods}
        for s in range(0, x.shape[0], self.batch_size):
            t = None if y is None else np.asarray(y)[s:s + self.batch_size]
            out = ex.maps(x[s:s + self.batch_size], target=t,
                          alpha=alpha if alpha_methods(methods) else None)
            for m in methods:
                parts[m].append(out[m])
        return {m: np.concatenate(v) for m, v in parts.items()}

    def explain_fn(self, method: str, layer=None, alpha=None):
        """``explain(x, y) -> [N, H, W]`` for one method (the form the metrics take)."""
        return lambda x, y: self.maps(x, y, [method], layer, alpha)[method]

    def vectors(self, x, v, methods, inject, collect, alpha=None) -> dict[str, np.ndarray]:
        """Start every method's backward walk at layer ``inject`` with the vectors ``v``
        (one per row of ``x``) and return ``{"<method>@<layer>": [N, C, ...]}`` at the
        ``collect`` layers (the cosine-similarity-convergence check)."""
        methods = parse_methods(methods)
        collect = tuple(str(c) for c in collect)
        ex = self.explainer(methods, None, inject=str(inject), collect=collect)
        names = [o.name for o in ex.session.get_outputs()]
        feeds_names = {i.name for i in ex.session.get_inputs()}
        if "inject" not in feeds_names:
            raise OptionError("the converted model has no `inject` input")
        x = np.asarray(x, dtype=np.float32)
        v = np.asarray(v, dtype=np.float32)
        wanted = [f"{m}@{c}" for m in methods for c in collect]
        parts: dict[str, list] = {w: [] for w in wanted}
        for s in range(0, x.shape[0], self.batch_size):
            feeds = {ex.input_name: x[s:s + self.batch_size], "inject": v[s:s + self.batch_size]}
            if alpha is not None and ex.alpha_input in feeds_names | {
                    i.name for i in ex.session.get_overridable_initializers()}:
                feeds[ex.alpha_input] = np.asarray(alpha, dtype=np.float32)
            out = dict(zip(names, ex.session.run(None, feeds)))
            for w in wanted:
                parts[w].append(out[w])
        return {w: np.concatenate(p) for w, p in parts.items()}

    def inject_shape(self, inject) -> list:
        ex = self.explainer(("gradient",), None, inject=str(inject), collect=("input",))
        return next(i.shape for i in ex.session.get_inputs() if i.name == "inject")
