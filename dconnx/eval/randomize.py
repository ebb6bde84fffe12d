"""Cascading parameter randomization on an ONNX model: its initializers are replaced
layer by layer from the top (Adebayo et al. 2018; Sixt et al. 2020; Quantus ``MPRT``).

The *original* model is edited and then converted again by dconnx. (Editing the
converted file instead would not do: conversion folds BatchNormalization into new,
renamed Conv initializers, so a randomized original weight would not reach them.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidModelError
from ..ops import WEIGHT_OPS

PARAM_OPS = WEIGHT_OPS     # the layers with trainable constant weights (their OpSpecs say so)


@dataclass
class ParamLayer:
    """One node with trainable constants: its name, type and the initializers it reads
    (input position -> initializer name), plus a short label for tables and plots."""
    index: int
    node_name: str
    op_type: str
    params: dict = field(default_factory=dict)    # input position -> initializer name
    label: str = ""


def _node_name(node, i: int) -> str:
    return node.name or f"{node.op_type}_{i}"


def _label(node_name: str, op_type: str) -> str:
    """'/features/features.15/Conv' -> 'features.15 (Conv)'."""
    parts = [p for p in node_name.split("/") if p]
    core = parts[-2] if len(parts) >= 2 else (parts[0] if parts else node_name)
    return f"{core} ({op_type})"


def parameter_layers(model: onnx.ModelProto) -> list[ParamLayer]:
    """Nodes with initializer weights (Conv, Gemm, MatMul with a constant, BatchNorm), in
    graph order. Initializers reached through an Identity node (exporters deduplicate
    equal tensors that way) count as the node's own."""
    inits = {t.name for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits}
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in PARAM_OPS:
            continue
        params = {}
        for pos, name in enumerate(node.input):
            if pos == 0 and node.op_type != "MatMul":
                continue
            src = alias.get(name, name)
            if src in inits:
                params[pos] = src
        if node.op_type == "MatMul" and 1 not in params:
            continue          # x @ y of two data tensors, or a constant left operand: no weight to randomize
        if params:
            name = _node_name(node, i)
            layers.append(ParamLayer(len(layers), name, node.op_type, params, _label(name, node.op_type)))
    labels = [l.label for l in layers]
    for l in layers:
        if labels.count(l.label) > 1:
            l.label = f"{l.label} #{l.index}"
    return layers


def _fan_in(node: onnx.NodeProto, w: np.ndarray) -> int:
    if node.op_type == "ConvTranspose":
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        return int(w.shape[0] // max(groups, 1) * np.prod(w.shape[2:]))
    if node.op_type == "Conv":
        return int(np.prod(w.shape[1:]))
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(w.shape[1] if trans_b else w.shape[0])
    if node.op_type == "MatMul":
        return int(w.shape[-2]) if w.ndim >= 2 else int(w.shape[0])
    return 1


def torch_like_init(node: onnx.NodeProto, arrays: dict, rng: np.random.Generator) -> dict:
    """New values for one node's initializers, drawn as PyTorch's ``reset_parameters``
    does (which Quantus' MPRT calls): weights and biases of Conv/Linear uniform in
    ``±1/√fan_in`` (``kaiming_uniform_(a=√5)``), BatchNorm reset to the identity
    (scale 1, shift 0, mean 0, variance 1). ``arrays``: input position -> array."""
    out = {}
    if node.op_type == "BatchNormalization":
        for pos, arr in arrays.items():
            out[pos] = np.full_like(arr, 1.0 if pos in (1, 4) else 0.0)
        return out
    w_pos = 1
    fan_in = _fan_in(node, arrays[w_pos]) if w_pos in arrays else 1
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    for pos, arr in arrays.items():
        out[pos] = rng.uniform(-bound, bound, size=arr.shape).astype(arr.dtype)
    return out


def randomize_layers(model: onnx.ModelProto, layers: list[ParamLayer], *, seed: int = 42,
                     init: Callable | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers of ``layers`` replaced.

    ``init(node, arrays, rng) -> {position: new array}`` draws the new values
    (default `torch_like_init`); layer ``l`` uses ``numpy.random.default_rng([seed,
    l.index])``, so a layer gets the same values in every stage of a cascade. New
    values get fresh initializer names, so a tensor shared with another node stays
    untouched there."""
    init = init or torch_like_init
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    taken = set(inits) | {o for n in m.graph.node for o in n.output}
    nodes = list(m.graph.node)
    by_name = {_node_name(n, i): n for i, n in enumerate(nodes)}
    for layer in layers:
        node = by_name.get(layer.node_name)
        if node is None:
            raise InvalidModelError(f"no node '{layer.node_name}' to randomize")
        arrays = {pos: numpy_helper.to_array(inits[name]) for pos, name in layer.params.items()}
        new = init(node, arrays, np.random.default_rng([seed, layer.index]))
        for pos, arr in new.items():
            old = arrays[pos]
            arr = np.asarray(arr, dtype=old.dtype)
            if arr.shape != old.shape:
                raise ValueError(f"init returned {arr.shape} for {layer.node_name} input {pos}, "
                                 f"expected {old.shape}")
            k = 0
            while f"{layer.params[pos]}__rand{k}" in taken:
                k += 1
            name = f"{layer.params[pos]}__rand{k}"
            taken.add(name)
            m.graph.initializer.append(numpy_helper.from_array(arr, name))
            node.input[pos] = name
    return m


def cascade(model: onnx.ModelProto, *, seed: int = 42, order: str = "top_down",
            init: Callable | None = None, layers: list[ParamLayer] | None = None
            ) -> Iterator[tuple[ParamLayer, onnx.ModelProto]]:
    """Quantus' ``get_random_layer_generator``: yields ``(layer, model)`` where ``model``
    has ``layer`` and every layer above it randomized (``order="top_down"``,
    cascading), or only ``layer`` (``order="independent"``)."""
    layers = parameter_layers(model) if layers is None else list(layers)
    if order not in ("top_down", "independent"):
        raise ValueError("order must be top_down or independent")
    seq = layers[::-1] if order == "top_down" else layers
    done = []
    for layer in seq:
        done = done + [layer] if order == "top_down" else [layer]
        yield layer, randomize_layers(model, done, seed=seed, init=init)
