"""Conv, Gemm, MatMul: the weight-linear ops.

Transposed convolutions with stride 1 are emitted as a Conv with the flipped,
transposed kernel (faster than ConvTranspose in onnxruntime, same result);
strided ones as ConvTranspose with the output padding that restores the
input size.
"""
from __future__ import annotations

from ..errors import UnsupportedOpError
from ..ir import attrs, node_label
from .base import SIGNED_PARTS, LinearMap, deflinear, weight_variant
from .checks import all_of, constant_parameters, one_data_operand


class ConvFamilyMap(LinearMap):
    """Conv and ConvTranspose, each the other's adjoint: the forward product is `forward_op`
    with the weight (or a variant) and the node's own geometry, the transposed product the
    other op with the same weight tensor. Subclasses set the geometry (k, nd, strides, dil,
    pads, group) and `_forward_attrs`."""
    forward_op = "Conv"

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.w = node.input[1]
        self.c = node.input[2] if len(node.input) > 2 and node.input[2] else None

    def weight(self):
        return self.w

    def _forward_attrs(self) -> dict:
        return dict(kernel_shape=self.k, strides=self.strides, dilations=self.dil, pads=self.pads,
                    group=self.group)

    def apply(self, x, variant="W"):
        return self._products(lambda v, var: self._forward(v, var, False), x, variant, "apply")

    def apply_biased(self, x, variant="W"):
        if self.c is None or variant in SIGNED_PARTS:
            return super().apply_biased(x, variant)
        return self._products(lambda v, var: self._forward(v, var, True), x, variant, "apply_biased")

    def _forward(self, x, variant, biased):
        ins = [x, weight_variant(self.comp, self.w, variant)]
        if biased:
            ins.append(weight_variant(self.comp, self.c, variant))
        op = self.forward_op
        return self.b.op(op, ins, **self._forward_attrs(),
                         hint=f"{self.y}::{op.lower()}.{variant}{'b' if biased else ''}")

    def bias(self, variant="W"):
        if self.c is None:
            return None
        shape = [-1] + [1] * self.nd
        c = self.comp.cached(("convbias", self.c), lambda: self.b.reshape(self.c, shape))
        return weight_variant(self.comp, c, variant)

    def transpose(self, ct, variant="W"):
        return self._products(self._adjoint, ct, variant, "transpose")

    def _adjoint(self, ct, variant):
        raise NotImplementedError


class ConvMap(ConvFamilyMap):
    def __init__(self, comp, node):
        super().__init__(comp, node)
        wshape = comp.view.shape(self.w)
        self.k = list(self.attrs.get("kernel_shape", wshape[2:]))
        nd = len(self.k)
        self.nd = nd
        self.strides = list(self.attrs.get("strides", [1] * nd))
        self.dil = list(self.attrs.get("dilations", [1] * nd))
        self.pads = list(self.attrs.get("pads", [0] * (2 * nd)))
        self.group = int(self.attrs.get("group", 1))
        self.cout = wshape[0]
        self.cin_g = wshape[1]

    def _flipped(self, variant):
        """Kernel of the adjoint as a stride-1 Conv: in/out channels swapped per group, space
        flipped. Built once from W; the variants are taken of the flipped kernel."""
        def make_base():
            b, g = self.b, self.group
            w = self.w
            axes = list(range(2, 2 + self.nd))
            if g > 1:
                w5 = b.reshape(w, [g, self.cout // g, self.cin_g] + self.k)
                wt = b.op("Transpose", [w5], perm=[0, 2, 1] + list(range(3, 3 + self.nd)))
                wt = b.reshape(wt, [g * self.cin_g, self.cout // g] + self.k)
            else:
                wt = b.op("Transpose", [w], perm=[1, 0] + axes)
            big = 2 ** 62
            return b.slice(wt, [-1] * self.nd, [-big] * self.nd, axes, [-1] * self.nd,
                           hint=f"{self.w}::flipT")
        base = self.comp.cached(("flipT", self.w), make_base)
        return weight_variant(self.comp, base, variant)

    def _adjoint(self, ct, variant):
        """ConvTranspose with the weight the forward product reads, or a stride-1 Conv with the
        flipped kernel: faster in onnxruntime for every stride-1 shape measured (0.2-0.8x for
        depthwise and grouped, 0.5x for dense 3x3; benchmarks/RESULTS.md), but its flipped copies
        stay in the session beside the forward kernels. So the flipped form where every variant
        is precomputed or the adjoint kernels are ("adjoints"), and for grouped convolutions
        (depthwise ones above all), whose kernels are small, also where the session holds only W
        and |W|. Strided ones keep ConvTranspose
        (for depthwise ones a polyphase Conv + DepthToSpace or zero insertion + Conv measured
        2-20x slower: onnxruntime's DepthToSpace and Pad dominate)."""
        b = self.b
        in_shape = self.comp.view.shape(self.x)
        out_shape = self.comp.view.shape(self.y)
        nd = self.nd
        reach = [self.dil[i] * (self.k[i] - 1) for i in range(nd)]
        flip_pads = [reach[i] - self.pads[i] for i in range(nd)] + \
                    [reach[i] - self.pads[nd + i] for i in range(nd)]
        layout = self.comp.opts.weight_variants
        flipped = layout in ("precomputed", "adjoints") or (layout == "session" and self.group > 1)
        if flipped and all(s == 1 for s in self.strides) and all(p >= 0 for p in flip_pads):
            return b.op("Conv", [ct, self._flipped(variant)], kernel_shape=self.k, strides=[1] * nd,
                        dilations=self.dil, pads=flip_pads, group=self.group,
                        hint=f"{self.x}::convT.{variant}")
        out_pad = []
        for i in range(nd):
            full = (out_shape[2 + i] - 1) * self.strides[i] - self.pads[i] - self.pads[nd + i] \
                + reach[i] + 1
            out_pad.append(in_shape[2 + i] - full)
        if any(p < 0 or p >= max(self.strides[i], self.dil[i]) for i, p in enumerate(out_pad)):
            raise UnsupportedOpError([(node_label(self.node), "Conv",
                                       f"cannot build the transposed convolution (output padding {out_pad})")])
        w = weight_variant(self.comp, self.w, variant)
        return b.op("ConvTranspose", [ct, w], kernel_shape=self.k, strides=self.strides,
                    dilations=self.dil, pads=self.pads, group=self.group,
                    output_padding=out_pad if any(out_pad) else None,
                    hint=f"{self.x}::convT.{variant}")


class GemmMap(LinearMap):
    """Canonical Gemm: transA = 0, alpha = beta = 1 (canonicalize folds the rest)."""

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.w = node.input[1]
        self.c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self.trans_b = int(self.attrs.get("transB", 0))

    def weight(self):
        return self.w

    def apply(self, x, variant="W"):
        return self._products(lambda v, var: self._gemm(v, var, False), x, variant, "apply")

    def apply_biased(self, x, variant="W"):
        if self.c is None or variant in SIGNED_PARTS:
            return super().apply_biased(x, variant)
        return self._products(lambda v, var: self._gemm(v, var, True), x, variant, "apply_biased")

    def _gemm(self, x, variant, biased):
        ins = [x, weight_variant(self.comp, self.w, variant)] + ([self.bias(variant)] if biased else [])
        return self.b.op("Gemm", ins, transB=self.trans_b or None,
                         hint=f"{self.y}::gemm.{variant}{'b' if biased else ''}")

    def bias(self, variant="W"):
        return None if self.c is None else weight_variant(self.comp, self.c, variant)

    def transpose(self, ct, variant="W"):
        return self._products(lambda v, var: self.b.op(
            "Gemm", [v, weight_variant(self.comp, self.w, var)], transB=(1 - self.trans_b) or None,
            hint=f"{self.x}::gemmT.{var}"), ct, variant, "transpose")


class MatMulMap(LinearMap):
    """x @ B with a constant B of rank 2."""

    def __init__(self, comp, node):
        super().__init__(comp, node, node.input[0], node.output[0])
        self.w = node.input[1]

    def weight(self):
        return self.w

    def apply(self, x, variant="W"):
        return self._products(lambda v, var: self.b.op(
            "MatMul", [v, weight_variant(self.comp, self.w, var)], hint=f"{self.y}::matmul.{var}"),
            x, variant, "apply")

    def transpose(self, ct, variant="W"):
        def product(v, var):
            wt = self.comp.cached(("matmulT", self.w, var), lambda: self.b.op(
                "Transpose", [weight_variant(self.comp, self.w, var)], perm=[1, 0]))
            return self.b.op("MatMul", [v, wt], hint=f"{self.x}::matmulT.{var}")
        return self._products(product, ct, variant, "transpose")


def _check_conv(view, node, data_in, final):
    if view.is_data(node.input[1]):
        return "the weight depends on the data"
    return None


def _check_matmul(view, node, data_in, final):
    if not view.is_data(node.input[0]):
        return "only data @ constant is supported (constant @ data is not)"
    wshape = view.shape(node.input[1])
    if wshape is None or len(wshape) != 2:
        return "only a rank-2 constant right operand is supported"
    return None


def _check_gemm(view, node, data_in, final):
    if int(attrs(node).get("transA", 0)):
        return "transA=1 would put the batch axis second"
    return None


_WEIGHT_LAYER = dict(shift=True, recenter=True, weights=True, const_operands=True, absorbs_batchnorm=True)
deflinear("Conv", "linear", ConvMap, **_WEIGHT_LAYER, auto_pad=True,
          check=all_of(one_data_operand, constant_parameters, _check_conv),
          doc="any stride/padding/dilation/groups (grouped, depthwise); constant weight and bias")
deflinear("Gemm", "linear", GemmMap, **_WEIGHT_LAYER,
          check=all_of(one_data_operand, constant_parameters, _check_gemm),
          doc="constant weight (transB either way) and bias; alpha/beta/transA folded by canonicalize")
deflinear("MatMul", "linear", MatMulMap, **{**_WEIGHT_LAYER, "absorbs_batchnorm": False},
          check=all_of(one_data_operand, constant_parameters, _check_matmul),
          doc="data @ constant 2-D matrix (a MatMul of two data tensors is refused)")
