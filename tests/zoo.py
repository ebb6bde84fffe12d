"""Test model zoo: ReLU CNN architectures with random weights, exported to ONNX.

Every model is built deterministically from a seed, with *randomized*
BatchNorm statistics and affine parameters (so BN folding is exercised and
cannot hide behind identity statistics) and randomized conv/linear biases.
Models are exported with either the TorchScript exporter (``dynamo=False``,
opset 17) or the dynamo exporter (``dynamo=True``; large models keep their
weights in an external ``.onnx.data`` file, which the compiler must load).

Importing this module imports torchvision; ``torchvision_ops`` (the import
shim beside this file) is imported first.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_ops  # noqa: E402,F401  (must precede torchvision)

import filelock  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402

TORCHVISION = ("vgg16", "resnet18", "resnet50", "densenet121", "mobilenet_v2",
               "squeezenet1_1", "shufflenet_v2_x0_5")
CUSTOM = ("tiny_cnn", "tiny_residual")
NAMES = CUSTOM + TORCHVISION
EXPORTERS = ("torchscript", "dynamo")

# Highest ONNX IR version / opset the pinned onnxruntime accepts.
MAX_IR_VERSION = 13
MAX_OPSET = 26
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18

_INPUT_SIZES = {
    # VGG16's AdaptiveAvgPool2d((7, 7)) must be an identity (7x7 features) for
    # the TorchScript exporter, which only exports adaptive pools it can
    # express as a fixed pool; 224x224 gives 7x7 features.
    "vgg16": (3, 224, 224),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
    "densenet121": (3, 64, 64),
    "mobilenet_v2": (3, 64, 64),
    "squeezenet1_1": (3, 64, 64),
    "shufflenet_v2_x0_5": (3, 64, 64),
    "tiny_cnn": (3, 32, 32),
    "tiny_residual": (3, 32, 32),
}


# --------------------------------------------------------------------------
# Small custom nets
# --------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """conv-bn-relu-maxpool(3x3, s2, overlapping)-conv-relu-avgpool-flatten-linear."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),  # 32 -> 16, overlapping windows
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),  # 16 -> 8
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(32 * 8 * 8, n_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class TinyResidual(nn.Module):
    """Residual block with add, a concat branch, ReLU6, a depthwise conv, GAP, linear head."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        # residual block: out = relu(x + bn(conv(relu(bn(conv(x))))))
        self.res_conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(16)
        self.res_conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        # concat branch: [relu(conv1x1), relu6(bn(conv3x3 stride... ))] along channels
        self.branch_a = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(inplace=True))
        self.branch_b = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(12), nn.ReLU6(inplace=True))
        # depthwise separable: depthwise 3x3 (stride 2) + BN + ReLU6, pointwise + BN + ReLU
        self.dw = nn.Sequential(nn.Conv2d(20, 20, 3, stride=2, padding=1, groups=20, bias=False),
                                nn.BatchNorm2d(20), nn.ReLU6(inplace=True))
        self.pw = nn.Sequential(nn.Conv2d(20, 32, 1, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x):
        x = self.stem(x)
        r = self.res_bn2(self.res_conv2(self.relu(self.res_bn1(self.res_conv1(x)))))
        x = self.relu(x + r)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.pw(self.dw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class VGG16Small(nn.Module):
    """torchvision's VGG16 for size x size inputs (size a multiple of 32) in a test's memory.

    Its `features` (cfg "D") and classifier layout are torchvision's, with torchvision's weight
    init; the AdaptiveAvgPool2d((7, 7)), an identity at 224x224 that canonicalization removes,
    is left out (neither exporter writes it as supported ops when it upsamples), and the
    first Linear takes the (size/32)² features: 8.4M weights at 64x64 instead of 103M.
    """

    def __init__(self, size: int = 64, n_classes: int = 1000):
        super().__init__()
        if size % 32:
            raise ValueError(f"VGG16Small needs a multiple of 32, not {size}")
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        k = size // 32
        self.classifier = nn.Sequential(
            nn.Linear(512 * k * k, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, n_classes))
        for m in self.modules():     # torchvision.models.VGG's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def build_vgg16_small(size: int = 64, seed: int = 0) -> nn.Module:
    """VGG16Small with seeded random weights and randomized biases (as `build`), in eval mode."""
    torch.manual_seed(seed)
    model = VGG16Small(size)
    _randomize(model, seed)
    return model.eval()


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------
def input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) input size used for `name`."""
    try:
        return _INPUT_SIZES[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {NAMES}") from None


def _randomize(model: nn.Module, seed: int) -> None:
    """Randomize BN statistics/affine parameters and conv/linear biases in place."""
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def build(name: str, seed: int = 0) -> nn.Module:
    """Model `name` with seeded random weights and randomized BN, in eval mode."""
    input_size(name)  # validates the name
    torch.manual_seed(seed)
    if name == "tiny_cnn":
        model = TinyCNN()
    elif name == "tiny_residual":
        model = TinyResidual()
    else:
        model = getattr(torchvision.models, name)(weights=None)
    _randomize(model, seed)
    # in-place ReLUs are fine for export and inference; keep the modules as built
    return model.eval()


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
class ExportError(RuntimeError):
    """An exporter failed on a model (no silent fallback to the other exporter)."""


def export(model: nn.Module, path, exporter: str, input_shape, batch_dynamic: bool = True,
           seed: int = 0, external_data: bool = True) -> pathlib.Path:
    """Export `model` to `path` with input "input" [N, *input_shape] and output "logits".

    exporter: "torchscript" (opset 17, dynamic_axes on the batch) or "dynamo"
    (dynamic batch through dynamic_shapes; with external_data=True, the
    exporter's default, the weights are written to ``<path>.data``). Returns
    the path. Checks ir_version <= 13 and opset <= 26.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    # batch 2: torch.export specializes dimensions of size 0/1
    x = torch.randn((2, *input_shape), generator=gen)
    if exporter == "torchscript":
        kwargs = {}
        if batch_dynamic:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False,
                              opset_version=TORCHSCRIPT_OPSET,
                              input_names=["input"], output_names=["logits"], **kwargs)
        except Exception as e:  # pragma: no cover - reported to the caller
            raise ExportError(f"TorchScript export failed for {type(model).__name__}: {e}") from e
    elif exporter == "dynamo":
        kwargs = {}
        if batch_dynamic:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        try:
            # Writing through `f` is what users get by default: the weights go to
            # `<path>.data` beside the model (external_data=True). Without autograd the
            # export is the same byte for byte (compared for every zoo model), and faster
            # for some (DenseNet121: 13.4 s -> 10.8 s).
            with torch.no_grad():
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=DYNAMO_OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  external_data=external_data, verbose=False, **kwargs)
        except Exception as e:
            raise ExportError(f"dynamo export failed for {type(model).__name__}: "
                              f"{type(e).__name__}: {e}") from e
    else:
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', not {exporter!r}")

    proto = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if proto.ir_version > MAX_IR_VERSION or opset > MAX_OPSET:
        raise ExportError(f"{path.name}: ir_version {proto.ir_version} / opset {opset} exceeds "
                          f"what onnxruntime accepts (ir <= {MAX_IR_VERSION}, opset <= {MAX_OPSET})")
    return path


def exported(name: str, exporter: str, cache_dir, seed: int = 0) -> pathlib.Path:
    """Path to `name` exported with `exporter`, built and exported once into cache_dir.

    The cache entry is the directory ``cache_dir/<name>-<exporter>-s<seed>/``
    holding ``model.onnx`` (and ``model.onnx.data`` if the exporter wrote
    external data). It is written to a temporary directory and renamed into
    place, so an interrupted export never leaves a half-written entry.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    cache_dir = pathlib.Path(cache_dir)
    entry = cache_dir / f"{name}-{exporter}-s{seed}"
    onnx_path = entry / "model.onnx"
    if onnx_path.is_file():
        return onnx_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # one process exports an entry; the others (pytest-xdist workers sharing the cache) wait for it
    with filelock.FileLock(str(cache_dir / f".{entry.name}.lock")):
        if onnx_path.is_file():
            return onnx_path
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache_dir))
        try:
            export(build(name, seed), tmp / "model.onnx", exporter, input_size(name), seed=seed)
            os.rename(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return onnx_path


def op_types(path) -> list[str]:
    """Sorted op types (domain-qualified when not the default domain) in a model's main graph."""
    proto = onnx.load(str(path), load_external_data=False)
    ops = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    # dynamo exports may keep model-local functions; include their bodies
    for fn in proto.functions:
        for node in fn.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
    return sorted(ops)
