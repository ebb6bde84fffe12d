"""Options and the shared state of one conversion (what the passes read and extend)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .errors import OptionError
from .graph import ModelView
from .ir import ONNX_TO_NP, GraphBuilder

# weight_variants="auto" folds the adjoint kernels ("adjoints") when the heads are among these, whose
# transposed products are Wᵀ and |W|ᵀ only, and holds W and |W| only ("session") otherwise:
# measured on ResNet50 (benchmarks/RESULTS.md), the flipped kernels keep SplitGrad's session
# within 2x the original's memory (1.87x) and make it 1.2-1.4x faster (the gradient baselines,
# LRP-epsilon, DeepLIFT and IG: 1.1-1.2x, with one flipped copy of W); with SplitLRP's products
# beside them they would take all three heads to 2.76x.
ADJOINT_HEADS = frozenset({"splitgrad", "splitcam", "gradient", "gradxinput", "guidedbp", "gradcam", "layercam",
                           "lrp_epsilon", "deeplift", "deeplift_captum", "ig"})


@dataclass
class Options:
    """Every choice of a conversion, with the documented defaults."""
    methods: tuple[str, ...] = ("splitgrad",)   # () for the g and h outputs only
    layer: str | int | None = None     # tensor name, "N", "N:out", or None = the input
    alpha: float = 0.35                # default value of the `alpha` graph input
    alpha_mode: str = "constant"       # "constant" | "frobenius"
    maxpool: str = "wta"               # "wta" | "dc"
    stabilize: str = "recenter"        # "recenter" | "none"
    relu_backward: str = "standard"    # "standard" | "sum" | "mask_diff"
    ties: str = "strict"               # "strict": 1[x > 0]; "geq": 1[x >= 0]
    linear_form: str = "sumdiff"       # "sumdiff" (two products) | "four" (four products)
    share_forward: bool = True         # reuse the original activations for recentered streams
    weight_variants: str = "auto"      # "auto" | "session" | "adjoints" | "per-run" | "precomputed"
    #                                    (dconnx/ops/base.py; "auto": see ADJOINT_HEADS)
    fold_batchnorm: bool = True        # False: keep BN as its own shift point (the authors' reading)
    readable_names: bool = False       # descriptive names for generated tensors (bigger file)
    channel_axis: int | None = None    # channel axis of the input (None: detected; NCHW → 1, NHWC → 3)
    precision: str = "float32"         # "float16": the converted graph computes in half (for CUDA)
    inject: str | int | None = None    # start the backward walk at this layer from an `inject` input
    collect: tuple = ()                # layers whose per-method vectors become outputs "<method>@<layer>"
    lrp_epsilon: float = 1e-6
    reference: float = 0.0             # deeplift/ig: default value of the `reference` graph input
    ig_steps: int = 50                 # ig: number of points of the path integral (Captum's n_steps)
    ig_method: str = "gausslegendre"   # ig: riemann_left|right|middle|trapezoid | gausslegendre
    normalize: str = "none"            # "none" | "max" | "minmax"
    upsample: bool = True
    output: str | None = None          # which graph output to explain (default: the first)
    expose: tuple[str, ...] = ()       # tensors whose streams/sensitivities become outputs (tests)
    check: bool = True                 # run checker + strict shape inference on the result
    mean: tuple | None = None          # input normalization recorded for `dconnx explain`
    std: tuple | None = None
    class_names: tuple | None = None   # one name per explained class, recorded for `dconnx explain`

    _CHOICES = {
        "alpha_mode": ("constant", "frobenius"),
        "maxpool": ("wta", "dc"),
        "stabilize": ("recenter", "none"),
        "relu_backward": ("standard", "sum", "mask_diff"),
        "ties": ("strict", "geq"),
        "linear_form": ("sumdiff", "four"),
        "weight_variants": ("auto", "session", "adjoints", "per-run", "precomputed"),
        "normalize": ("none", "max", "minmax"),
        "precision": ("float32", "float16"),
        "ig_method": ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"),
    }

    def validate(self) -> "Options":
        for key, allowed in self._CHOICES.items():
            if getattr(self, key) not in allowed:
                raise OptionError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.weight_variants == "auto":
            self.weight_variants = "adjoints" if set(self.methods) <= ADJOINT_HEADS else "session"
        if not (0.0 <= float(self.alpha) <= 0.5):
            raise OptionError(f"alpha={self.alpha} is outside [0, 0.5]")
        if self.lrp_epsilon < 0:
            raise OptionError(f"lrp_epsilon={self.lrp_epsilon} must be >= 0")
        least = 1 if self.ig_method == "gausslegendre" else 2
        if int(self.ig_steps) != self.ig_steps or self.ig_steps < least:
            raise OptionError(f"ig_steps={self.ig_steps}: {self.ig_method} needs a whole number >= {least}")
        return self


def channel_last_to_first(view, tensor: str) -> int | None:
    """rank − 1 when the tensor is channel-last and feeds the Transpose that makes it
    channel-first ([0, r−1, 1, …, r−2], what TensorFlow and JAX exports start with)."""
    rank = view.rank(tensor)
    if not rank or rank < 3:
        return None
    to_first = [0, rank - 1] + list(range(1, rank - 1))
    for node in view.consumers.get(tensor, []):
        if node.op_type == "Transpose":
            perm = [int(p) for p in next(a.ints for a in node.attribute if a.name == "perm")]
            if perm == to_first:
                return rank - 1
    return None


@dataclass
class StreamPair:
    """The two nonnegative streams of one tensor, x = p - n (tensor names)."""
    p: str
    n: str


@dataclass
class Compilation:
    """A canonical model plus everything the passes add to it."""
    model: onnx.ModelProto
    opts: Options
    view: ModelView = field(init=False)
    b: GraphBuilder = field(init=False)
    streams: dict[str, StreamPair] = field(default_factory=dict)     # after recentering
    pre_streams: dict[str, StreamPair] = field(default_factory=dict)  # an op's own output
    explained: str = ""           # the logits tensor the maps explain
    input_name: str = ""          # the data input the maps are drawn over
    input_channel_axis: int = 1   # its channel axis (detected or given)
    output_layers: set = field(default_factory=set)   # nodes whose shift is skipped
    new_inputs: list = field(default_factory=list)
    new_outputs: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cotangents: dict = field(default_factory=dict)   # (ruleset, tensor) -> cotangent
    needed_nodes: set = field(default_factory=set)   # nodes the explained output depends on
    heads: list = field(default_factory=list)        # planned Head objects (passes/heads.py)
    rulesets: dict = field(default_factory=dict)     # name -> RuleSet used by the walk
    result: onnx.ModelProto | None = None   # the converted model (optimize pass)
    target_input: str = ""
    alpha_input: str = ""
    target_resolved: str = ""     # int64 [batch]: the explained class per sample
    fold_signed_parts: int = 0    # > 0: products with W⁺, W⁻ read them folded (folding_signed_parts)
    seed: str = ""                # one-hot [batch, classes] of the explained logit
                                  # (dense outputs: ⊗ the region, shaped like the output)
    region_input: str = ""        # dense outputs: the `region` mask input [batch, *spatial]
    region_mask: str = ""         # that mask as [batch|1, 1, *spatial], broadcast over classes
    inject_input: str = ""        # the `inject` input when the walk starts at a hidden layer
    shift_factor: str = ""        # 1 − 2α, from the alpha input
    zero_streams: set = field(default_factory=set)   # stream tensors that are structurally 0
    fusions: dict = field(default_factory=dict)      # node key -> Fusion (dconnx/ops/fused.py)
    fused_interior: set = field(default_factory=set) # inner nodes of those subgraphs
    _cache: dict = field(default_factory=dict)

    @contextmanager
    def folding_signed_parts(self):
        """Inside, a product with W⁺ or W⁻ reads that weight folded, not the half-sum of the W and
        |W| products: the LRP baselines' z⁺ = W⁺x, as their reference rules compute it (a half-sum
        loses float32 digits where W⁺x is small against |W|x: 1e-3 of the relevance measured)."""
        self.fold_signed_parts += 1
        try:
            yield
        finally:
            self.fold_signed_parts -= 1

    def __post_init__(self):
        self.refresh()

    def refresh(self) -> None:
        self.view = ModelView(self.model)
        taken = set()
        for node in self.model.graph.node:
            taken.update(node.output)
            taken.update(node.input)
            taken.add(node.name)
        taken.update(t.name for t in self.model.graph.initializer)
        taken.update(i.name for i in self.model.graph.input)
        taken.update(o.name for o in self.model.graph.output)
        elem = self.model.graph.input[0].type.tensor_type.elem_type if self.model.graph.input else 1
        self.b = GraphBuilder(taken, float_dtype=ONNX_TO_NP.get(elem, np.float32),
                              readable=self.opts.readable_names)
        self.b.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def channel_axis_of(self, tensor: str) -> int:
        """The channel axis of a data tensor: the input's detected or given axis; 1 inside
        the network unless the tensor feeds a Transpose that makes it channel-first."""
        if tensor == self.input_name:
            return self.input_channel_axis
        return channel_last_to_first(self.view, tensor) or 1

    def spatial_shape(self, tensor: str) -> list:
        """The tensor's dims other than the batch and the channel axis."""
        shape = self.view.shape(tensor)
        axis = self.channel_axis_of(tensor)
        return [d for i, d in enumerate(shape) if i not in (0, axis)]

    def exposed(self) -> list[tuple[str, str]]:
        """(spec, tensor) for every `expose` entry: a tensor name or a layer index."""
        from .layers import resolve_layer
        return [(spec, resolve_layer(self.view, self.input_name, spec)[0]) for spec in self.opts.expose]

    def collected(self) -> list[tuple[str, str]]:
        from .layers import resolve_layer
        return [(spec, resolve_layer(self.view, self.input_name, spec)[0]) for spec in self.opts.collect]

    def exposed_tensors(self) -> list[str]:
        return [t for _, t in self.exposed()]

    @property
    def float_type(self) -> int:
        return onnx.helper.np_dtype_to_tensor_dtype(self.b.float_dtype)

    def cached(self, key, make: Callable[[], object]):
        """Emit something once per key (weight variants, masks, tiled tensors)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- forward values ----------------------------------------------------
    def stream(self, name: str) -> StreamPair:
        try:
            return self.streams[name]
        except KeyError:
            raise RuntimeError(f"no streams for tensor '{name}' (split pass missing?)") from None

    def pre_stream(self, name: str) -> StreamPair:
        return self.pre_streams.get(name) or self.stream(name)

    def is_zero(self, stream: str) -> bool:
        return stream in self.zero_streams

    def stream_sum(self, name: str) -> str:
        """p + n of a tensor (|x| under recentering)."""
        sp = self.stream(name)
        if self.is_zero(sp.n):
            return sp.p
        return self.cached(("S", name), lambda: self.b.add(sp.p, sp.n, hint=f"{name}::S"))

    def mask(self, x: str) -> str:
        """The Relu mask of tensor x as a bool tensor: x > 0 (or x >= 0 with ties='geq')."""
        def make():
            op = "Greater" if self.opts.ties == "strict" else "GreaterOrEqual"
            return self.b.op(op, [x, self.b.scalar(0.0)], hint=f"{x}::mask")
        return self.cached(("mask", x), make)

    def where(self, mask: str, a: str, b: str | None = None) -> str:
        """mask ? a : b (b = 0 when omitted)."""
        return self.b.op("Where", [mask, a, b if b is not None else self.b.scalar(0.0)])

    def batch_size(self) -> str:
        """int64 [1]: the run-time batch size of the data input."""
        return self.cached("batch", lambda: self.b.shape_of(self.input_name, 0, 1, hint="batch"))

    def maxpool_indices(self, node: onnx.NodeProto) -> str:
        """The Indices output of a canonical MaxPool node (added on first use)."""
        if len(node.output) > 1 and node.output[1]:
            return node.output[1]
        name = self.b.fresh(f"{node.output[0]}::indices")
        if len(node.output) > 1:
            node.output[1] = name
        else:
            node.output.append(name)
        return name

    def tiled(self, name: str, k: int) -> str:
        """`name` repeated k times along the batch axis (for stacked cotangents)."""
        if k == 1:
            return name
        return self.cached(("tile", name, k), lambda: self.b.concat([name] * k, axis=0,
                                                                      hint=f"{name}::x{k}"))
