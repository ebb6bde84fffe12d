"""Layer names: tensor names of the canonical graph, or poster-style indices.

Index N names the tensor entering the N-th op of the feature chain that starts
at the input (each canonical op counts one, as torchvision's
`vgg16.features[N]` does for Conv/ReLU/MaxPool); "N:out" the tensor leaving
it; 0 is the input. Indices are defined only while the graph is a chain.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import LayerError
from .ir import node_label


@dataclass
class ChainOp:
    index: int
    node_name: str
    op_type: str
    tensor_in: str
    tensor_out: str


def feature_chain(view, input_name: str) -> list[ChainOp]:
    """The ops that follow each other from the input while each tensor has one consumer."""
    chain = []
    t = input_name
    while True:
        users = [n for n in view.consumers.get(t, []) if any(i == t for i in n.input)]
        if len(users) != 1:
            break
        node = users[0]
        data = [i for i in node.input if i and view.is_data(i)]
        if len(data) != 1 or not node.output:
            break
        out = node.output[0]
        chain.append(ChainOp(len(chain), node_label(node), node.op_type, t, out))
        t = out
        if t in view.output_names:
            break
    return chain


def resolve_layer(view, input_name: str, layer) -> tuple[str, str]:
    """(tensor name, description) for a layer given as None, a tensor name, N or 'N:out'."""
    if layer is None or layer == "" or layer == "input":
        return input_name, "the input"
    spec = str(layer).strip()
    idx, out = None, False
    if spec.endswith(":out") and spec[:-4].lstrip("-").isdigit():
        idx, out = int(spec[:-4]), True
    elif spec.lstrip("-").isdigit():
        idx = int(spec)
    if idx is None:
        if spec in view.data_tensors:
            return spec, f"tensor '{spec}'"
        near = sorted(t for t in view.data_tensors if spec.lower() in t.lower())[:8]
        hint = f" Similar names: {', '.join(near)}." if near else ""
        raise LayerError(f"layer '{spec}' is neither an index nor a data tensor of the canonical "
                         f"graph.{hint} `dconnx layers MODEL` lists them.")
    chain = feature_chain(view, input_name)
    if idx == 0 and not out:
        return input_name, "layer 0 (the input)"
    if idx < 0 or idx >= len(chain):
        raise LayerError(f"layer index {spec} is outside the feature chain of this model, which has "
                         f"{len(chain)} ops in a row from the input (0..{len(chain) - 1}); use a tensor "
                         "name beyond it (`dconnx layers MODEL`)")
    if out:
        op = chain[idx]
        return op.tensor_out, f"layer {idx}:out (leaving {op.op_type} '{op.node_name}')"
    op = chain[idx]
    return op.tensor_in, f"layer {idx} (entering {op.op_type} '{op.node_name}')"
