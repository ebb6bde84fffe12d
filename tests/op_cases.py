"""The op table: one small torch module per supported op (and per interesting attribute
combination), exported to ONNX in the tests. `ONNX_OPS` names the canonical op(s) each
case must produce, so the registry-completeness test can find a case for every op."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class Head(nn.Module):
    """op(x) flattened to [batch, features]: the explained 'logits' of an op test."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return torch.flatten(self.fn(x), 1)


class Lambda(nn.Module):
    def __init__(self, f, **mods):
        super().__init__()
        self.f = f
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.f(self, x)


@dataclass
class OpCase:
    name: str
    make: object               # () -> nn.Module producing any shape
    shape: tuple = (2, 3, 8, 8)
    ops: tuple = ()            # canonical ONNX ops this case exercises
    keep_bn: bool = False      # export BatchNormalization unfolded
    pool: bool = False         # run both MaxPool modes
    extra: dict = field(default_factory=dict)

    def module(self, seed=0):
        torch.manual_seed(seed)
        m = Head(self.make())
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                with torch.no_grad():
                    mod.running_mean.normal_(0, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(-1.5, 1.5)
                    mod.bias.normal_(0, 0.5)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)) \
                    and mod.bias is not None:
                with torch.no_grad():
                    mod.bias.normal_(0, 0.3)
        return m.eval()


def _conv(*a, **k):
    return lambda: nn.Conv2d(*a, **k)


CASES = [
    OpCase("conv3x3", _conv(3, 4, 3, padding=1), ops=("Conv",)),
    OpCase("conv_stride2", _conv(3, 4, 3, stride=2, padding=1), ops=("Conv",)),
    OpCase("conv_stride2_even", _conv(3, 4, 2, stride=2), ops=("Conv",)),
    OpCase("conv_dilated", _conv(3, 4, 3, padding=2, dilation=2), ops=("Conv",)),
    OpCase("conv_grouped", _conv(4, 6, 3, padding=1, groups=2), shape=(2, 4, 8, 8), ops=("Conv",)),
    OpCase("conv_depthwise_mult2", _conv(4, 8, 3, padding=1, groups=4), shape=(2, 4, 8, 8), ops=("Conv",)),
    OpCase("conv_asym_nobias", _conv(3, 4, (3, 1), stride=(2, 1), padding=(1, 0), bias=False), ops=("Conv",)),
    OpCase("conv_strided_grouped", _conv(4, 4, 3, stride=2, padding=1, groups=4), shape=(2, 4, 9, 9),
           ops=("Conv",)),
    OpCase("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), shape=(2, 3, 10), ops=("Conv",)),
    OpCase("linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7)), ops=("Gemm",)),
    OpCase("matmul", lambda: Lambda(lambda s, x: torch.flatten(x, 1) @ s.w,
                                    w=nn.Parameter(torch.randn(3 * 8 * 8, 5))), ops=("Gemm",)),
    OpCase("matmul_3d", lambda: Lambda(lambda s, x: torch.flatten(x, 2) @ s.w,
                                       w=nn.Parameter(torch.randn(8 * 8, 5))), ops=("MatMul",)),
    OpCase("relu", lambda: nn.ReLU(), ops=("Relu",)),
    OpCase("conv_relu", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), ops=("Conv", "Relu")),
    OpCase("relu6", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6()),
           ops=("Relu", "Sub")),
    OpCase("hardtanh", lambda: nn.Hardtanh(-1.0, 2.0), ops=("Relu", "Sub", "Add")),
    OpCase("leaky_relu", lambda: nn.LeakyReLU(0.1), ops=("Relu", "Mul", "Add")),
    OpCase("prelu", lambda: nn.PReLU(3, init=0.2), ops=("Relu", "Mul", "Add")),
    OpCase("maxpool2", lambda: nn.MaxPool2d(2), ops=("MaxPool",), pool=True),
    OpCase("maxpool3s2_overlap", lambda: nn.MaxPool2d(3, 2, padding=1), ops=("MaxPool",), pool=True),
    OpCase("maxpool_ceil", lambda: nn.MaxPool2d(3, 2, ceil_mode=True), ops=("MaxPool",), pool=True),
    OpCase("maxpool_dilated", lambda: nn.MaxPool2d(3, 1, dilation=2), ops=("MaxPool",), pool=True),
    OpCase("conv_relu_maxpool", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                                      nn.MaxPool2d(3, 2, padding=1)),
           ops=("Conv", "Relu", "MaxPool"), pool=True),
    OpCase("avgpool_excl_pad", lambda: nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
           ops=("AveragePool",)),
    OpCase("avgpool_incl_pad", lambda: nn.AvgPool2d(3, 2, padding=1, count_include_pad=True),
           ops=("AveragePool",)),
    OpCase("avgpool2", lambda: nn.AvgPool2d(2), ops=("AveragePool",)),
    OpCase("global_avgpool", lambda: nn.AdaptiveAvgPool2d(1), ops=("GlobalAveragePool",)),
    OpCase("reduce_mean", lambda: Lambda(lambda s, x: x.mean((2, 3), keepdim=True)),
           ops=("GlobalAveragePool",)),
    OpCase("reduce_sum_channels", lambda: Lambda(lambda s, x: torch.relu(x).sum(1, keepdim=True)),
           ops=("ReduceSum",)),
    OpCase("mean_over_width", lambda: Lambda(lambda s, x: x.mean(3)), ops=("ReduceMean",)),
    OpCase("batchnorm_unfolded", lambda: nn.BatchNorm2d(3), ops=("BatchNormalization",), keep_bn=True),
    OpCase("conv_bn_folded", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
           ops=("Conv",), keep_bn=True),
    OpCase("residual_add", lambda: Lambda(lambda s, x: s.c(x) + x, c=nn.Conv2d(3, 3, 3, padding=1)),
           ops=("Conv", "Add")),
    OpCase("residual_sub", lambda: Lambda(lambda s, x: s.c(x) - x, c=nn.Conv2d(3, 3, 3, padding=1)),
           ops=("Conv", "Sub")),
    OpCase("mul_const", lambda: Lambda(lambda s, x: x * s.c,
                                       c=nn.Parameter(torch.tensor([-1.5, 0.5, 2.0]).view(3, 1, 1))),
           ops=("Mul",)),
    OpCase("div_const", lambda: Lambda(lambda s, x: x / 3.0), ops=("Mul",)),
    OpCase("add_const", lambda: Lambda(lambda s, x: x + s.c, c=nn.Parameter(torch.randn(3, 1, 1))),
           ops=("Add",)),
    OpCase("rsub_const", lambda: Lambda(lambda s, x: 2.0 - x), ops=("Sub",)),
    OpCase("permute", lambda: Lambda(lambda s, x: x.permute(0, 2, 3, 1)), ops=("Transpose",)),
    OpCase("unsqueeze_squeeze", lambda: Lambda(lambda s, x: torch.relu(x.unsqueeze(2)).squeeze(2)),
           ops=("Unsqueeze", "Squeeze", "Relu")),
    OpCase("pad", lambda: Lambda(lambda s, x: F.pad(x, (1, 2, 0, 1))), ops=("Pad",)),
    OpCase("slice", lambda: Lambda(lambda s, x: x[:, 1:3, 2:6]), ops=("Slice",)),
    OpCase("concat", lambda: Lambda(lambda s, x: torch.cat([x, s.c(x)], 1), c=nn.Conv2d(3, 2, 1)),
           ops=("Conv", "Concat")),
    OpCase("split", lambda: Lambda(lambda s, x: (lambda parts: torch.cat([torch.relu(parts[1]), parts[0]], 1))(
        torch.split(x, [1, 2], dim=1))), ops=("Split", "Relu", "Concat")),
    OpCase("reshape", lambda: Lambda(lambda s, x: x.reshape(x.shape[0], -1, 2)), ops=("Reshape",)),
]

def _interp(**k):
    return lambda: Lambda(lambda s, x: F.interpolate(x, **k))


def _convt(*a, **k):
    return lambda: nn.ConvTranspose2d(*a, **k)


# resampling and transposed convolution (Resize / ConvTranspose)
CASES += [
    OpCase("upsample_nearest2", _interp(scale_factor=2, mode="nearest"), shape=(2, 3, 5, 4), ops=("Resize",)),
    OpCase("upsample_nearest_size", _interp(size=(7, 11), mode="nearest"), shape=(2, 3, 5, 4),
           ops=("Resize",)),
    OpCase("upsample_bilinear", _interp(scale_factor=2, mode="bilinear"), shape=(2, 3, 5, 4),
           ops=("Resize",)),
    OpCase("upsample_bilinear_align", _interp(size=(9, 6), mode="bilinear", align_corners=True),
           shape=(2, 3, 5, 4), ops=("Resize",)),
    OpCase("downsample_bilinear", _interp(size=(3, 5), mode="bilinear"), shape=(2, 3, 8, 8), ops=("Resize",)),
    OpCase("conv_upsample_relu", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(
        scale_factor=2, mode="bilinear"), nn.ReLU()), shape=(2, 3, 4, 4), ops=("Conv", "Resize", "Relu")),
    OpCase("convT2", _convt(3, 4, 2, stride=2), shape=(2, 3, 4, 4), ops=("ConvTranspose",)),
    OpCase("convT3_pad_outpad", _convt(3, 4, 3, stride=2, padding=1, output_padding=1), shape=(2, 3, 4, 5),
           ops=("ConvTranspose",)),
    OpCase("convT_grouped_dilated", _convt(4, 6, 3, stride=3, padding=2, output_padding=2, groups=2,
                                           dilation=2, bias=False), shape=(2, 4, 3, 4), ops=("ConvTranspose",)),
    OpCase("convT_relu", lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=1, padding=1), nn.ReLU()),
           shape=(2, 3, 4, 4), ops=("ConvTranspose", "Relu")),
    OpCase("convT1d", lambda: nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1), shape=(2, 3, 6),
           ops=("ConvTranspose",)),
]

# max/min, abs, neg, global and spatial max (rewritten into Relu, Add/Sub, affine ops, MaxPool)
CASES += [
    OpCase("max_two_data", lambda: Lambda(lambda s, x: torch.maximum(s.c(x), x), c=nn.Conv2d(3, 3, 3, padding=1)),
           ops=("Conv", "Sub", "Relu", "Add")),
    OpCase("min_two_data", lambda: Lambda(lambda s, x: torch.minimum(x, s.c(x)), c=nn.Conv2d(3, 3, 1)),
           ops=("Conv", "Sub", "Relu")),
    OpCase("max_const", lambda: Lambda(lambda s, x: torch.maximum(x, s.c),
                                       c=nn.Parameter(torch.tensor([0.3, -0.2, 0.0]).view(3, 1, 1))),
           ops=("Sub", "Relu", "Add")),
    OpCase("abs", lambda: Lambda(lambda s, x: torch.abs(s.c(x)), c=nn.Conv2d(3, 2, 3, padding=1)),
           ops=("Conv", "Relu", "Mul", "Add")),
    OpCase("neg", lambda: Lambda(lambda s, x: torch.relu(-s.c(x)), c=nn.Conv2d(3, 2, 1)), ops=("Mul", "Relu")),
    OpCase("global_maxpool", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveMaxPool2d(1)),
           ops=("Conv", "MaxPool"), pool=True),
    OpCase("reduce_max_hw", lambda: Lambda(lambda s, x: s.c(x).amax((2, 3), keepdim=True),
                                           c=nn.Conv2d(3, 4, 1)), ops=("MaxPool",), pool=True),
    OpCase("reduce_max_w", lambda: Lambda(lambda s, x: x.amax(3)), ops=("MaxPool", "Reshape"), pool=True),
    OpCase("reduce_min_h", lambda: Lambda(lambda s, x: torch.relu(x).amin(2, keepdim=True) - x.amin(2, keepdim=True)),
           ops=("MaxPool", "Mul"), pool=True),
]

# AveragePool with ceil_mode partial windows (their own divisor)
CASES += [
    OpCase("avgpool_ceil_excl", lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
           shape=(2, 3, 8, 8), ops=("AveragePool",)),
    OpCase("avgpool_ceil_incl", lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=True),
           shape=(2, 3, 8, 8), ops=("AveragePool",)),
    OpCase("avgpool_ceil_nopad", lambda: nn.AvgPool2d(2, 2, ceil_mode=True), shape=(2, 3, 7, 5),
           ops=("AveragePool",)),
]

# data movement with a fixed gather per sample (the adjoint scatter-adds)
CASES += [
    OpCase("slice_steps", lambda: Lambda(lambda s, x: x[:, ::2, 1::3]), shape=(2, 4, 8, 8), ops=("Slice",)),
    OpCase("flip", lambda: Lambda(lambda s, x: s.c(x).flip(3), c=nn.Conv2d(3, 2, 3, padding=1)),
           ops=("Conv", "Slice")),
    OpCase("gather_repeated", lambda: Lambda(lambda s, x: x[:, [2, 0, 2]]), ops=("Gather",)),
    OpCase("expand", lambda: Lambda(lambda s, x: x[:, :1].expand(-1, 3, -1, -1)), ops=("Expand",)),
    OpCase("tile", lambda: Lambda(lambda s, x: torch.relu(x).repeat(1, 2, 1, 1)), ops=("Tile", "Relu")),
    OpCase("depth_to_space", lambda: Lambda(lambda s, x: F.pixel_shuffle(x, 2)), shape=(2, 8, 3, 4),
           ops=("DepthToSpace",)),
    OpCase("pad_reflect", lambda: Lambda(lambda s, x: F.pad(s.c(x), (1, 2, 1, 0), mode="reflect"),
                                         c=nn.Conv2d(3, 2, 1)), ops=("Pad",)),
    OpCase("pad_edge", lambda: Lambda(lambda s, x: F.pad(x, (2, 1, 0, 3), mode="replicate")), ops=("Pad",)),
]

BY_NAME = {c.name: c for c in CASES}

# ops that torch never exports, tested on graphs built in tests/test_ops_new.py
GRAPH_CASE_OPS = ("SpaceToDepth",)

# smooth and kinked activations (dconnx/ops/smooth.py), behind a Conv; float32-exact parameters.
# The Gelu and Mish ops come from the dynamo exporter (torchscript decomposes them).
def _conv_act(act):
    return lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act())


CASES += [
    OpCase("sigmoid", _conv_act(nn.Sigmoid), ops=("Sigmoid",)),
    OpCase("tanh", _conv_act(nn.Tanh), ops=("Tanh",)),
    OpCase("softplus", _conv_act(nn.Softplus), ops=("Softplus",)),
    OpCase("elu", _conv_act(lambda: nn.ELU(0.5)), ops=("Elu",)),
    OpCase("elu_kinked", _conv_act(lambda: nn.ELU(1.5)), ops=("Elu",)),
    OpCase("selu", _conv_act(nn.SELU), ops=("Selu",)),
    OpCase("celu", _conv_act(lambda: nn.CELU(0.5)), ops=("Elu",)),
    OpCase("hardsigmoid", _conv_act(nn.Hardsigmoid), ops=("HardSigmoid",)),
    OpCase("hardswish", _conv_act(nn.Hardswish), ops=("HardSwish",)),
    OpCase("gelu", _conv_act(nn.GELU), ops=("Gelu",), extra={"exporter": "dynamo"}),
    OpCase("gelu_tanh", _conv_act(lambda: nn.GELU(approximate="tanh")), ops=("Gelu",), extra={"exporter": "dynamo"}),
    OpCase("mish", _conv_act(nn.Mish), ops=("Softplus", "Tanh", "Mul"), extra={"exporter": "dynamo"}),
]
