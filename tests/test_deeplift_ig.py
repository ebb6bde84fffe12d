"""DeepLIFT (Rescale) and Integrated Gradients against Captum 0.9 (docs/baselines.md).

* `ig` against Captum's IntegratedGradients (same n_steps and method, same baseline) on
  ResNet18 and VGG16Small with random weights, and every quadrature on a small net;
  Σ IG − (f(x) − f(x₀)) within the Riemann bound h·TV(φ'), φ(a) = f_k(x₀ + a(x − x₀)).
* `deeplift_captum` against Captum's DeepLift on the stock torchvision modules (ResNet18,
  VGG16Small): there a ReLU feeding a MaxPool rescales the plain max-pool gradient.
* `deeplift` (the Rescale rule composed as defined) against Captum's DeepLift where Captum's
  hooks compose as documented (a Clone between each ReLU and its MaxPool, non-overlapping
  windows: VGG16Small), and complete for any reference: Σ = f(x) − f(x₀) on ResNet18 and
  VGG16Small (float32 rounding) and in float64 to 1e-12.

Tolerances: RTOL32 = 1e-4 relative to the reference's max |value| (as tests/test_baselines.py).
The reference x₀ is drawn at random and fed as the `reference` input (the default, zero,
is checked on the small net and through the CLI).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import baseline_refs as refs
import dconnx
import zoo
from dconnx.errors import DconnxError
from dconnx.methods import METHODS
from helpers import THREADS, export, rel_err, run, session as _session

torch.set_num_threads(THREADS)

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

RTOL32 = 1e-4
EPS32 = float(np.finfo(np.float32).eps)
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
SIZE = 64


def _close(ours, ref, tol, label):
    err = rel_err(ours, ref)
    print(f"[deeplift/ig] {label}: {err:.2e} (tolerance {tol:.0e})")
    assert err < tol, f"{label}: relative error {err:.3g} >= {tol:.3g}"


class Net:
    """A torch module, its ONNX export, an input, a random reference and our maps."""

    def __init__(self, name, module, batch, ig_steps):
        self.name, self.module, self.ig_steps = name, module.eval(), ig_steps
        self.proto = export(refs.without_inplace(module), torch.zeros(1, 3, SIZE, SIZE))
        gen = torch.Generator().manual_seed(11)
        self.x = torch.randn((batch, 3, SIZE, SIZE), generator=gen).numpy()
        self.x0 = (0.5 * torch.randn((batch, 3, SIZE, SIZE), generator=gen)).numpy()
        self.target = np.array([3, 7][:batch])
        conv = dconnx.convert(self.proto, methods="deeplift,deeplift_captum,ig", ig_steps=ig_steps).model
        self.out = run(conv, self.x, target=self.target, reference=self.x0)
        self._peers = {}

    def f(self, x):
        """f_k from the exported model itself (onnxruntime), the function the maps explain."""
        logits = _session(self.proto).run(None, {"input": x})[0]
        return logits[np.arange(len(self.target)), self.target]

    def peer(self, key, compute):
        if key not in self._peers:
            self._peers[key] = compute()
        return self._peers[key]


@pytest.fixture(scope="module")
def resnet18():
    return Net("resnet18", zoo.build("resnet18"), 2, 8)


@pytest.fixture(scope="module")
def vgg16():
    return Net("vgg16small", zoo.build_vgg16_small(SIZE), 1, 4)


NETS = ["resnet18", "vgg16"]


# --------------------------------------------------------------------------
# Captum on ResNet18 and VGG16Small
# --------------------------------------------------------------------------
@pytest.mark.parametrize("which", NETS)
def test_ig_equals_captum(which, request):
    net = request.getfixturevalue(which)
    ref = net.peer("ig", lambda: refs.captum_ig(refs.captum_ready(net.module), net.x, net.target,
                                                net.ig_steps, "gausslegendre", net.x0))
    _close(net.out["ig"], ref.sum(1), RTOL32, f"{net.name} ig ({net.ig_steps} steps) vs Captum")


@pytest.mark.parametrize("which", NETS)
def test_deeplift_captum_equals_captum_on_the_stock_module(which, request):
    net = request.getfixturevalue(which)
    ref = net.peer("stock", lambda: refs.captum_deeplift(refs.captum_ready(net.module, separate_maxpool=False),
                                                         net.x, net.target, net.x0))
    _close(net.out["deeplift_captum"], ref.sum(1), RTOL32, f"{net.name} deeplift_captum vs Captum DeepLift")
    # the two rules differ on these nets: the comparison is not between equal things by accident
    assert rel_err(net.out["deeplift"], ref.sum(1)) > 100 * RTOL32


def test_deeplift_equals_captum_with_its_rules_composed(vgg16):
    """VGG16Small: 2x2 max pools, no overlapping windows; a Clone between each ReLU and its
    MaxPool lets the ReLU's hook see the max-pool multiplier."""
    ref = refs.captum_deeplift(refs.captum_ready(vgg16.module), vgg16.x, vgg16.target, vgg16.x0)
    _close(vgg16.out["deeplift"], ref.sum(1), RTOL32, "vgg16small deeplift vs Captum DeepLift (Clone)")


@pytest.mark.xfail(strict=True, reason=(
    "Captum 0.9's maxpool rule returns max_unpool2d(...): where overlapping windows (ResNet's 3x3 "
    "stride-2 pool) share an argmax, one window's contribution overwrites the other's, so its sum "
    "misses f(x) - f(x0) (test_captum_clone_run_is_not_complete_with_overlapping_windows); dconnx "
    "adds them (complete)"))
def test_deeplift_equals_captum_with_overlapping_max_pool_windows(resnet18):
    ref = refs.captum_deeplift(refs.captum_ready(resnet18.module), resnet18.x, resnet18.target, resnet18.x0)
    _close(resnet18.out["deeplift"], ref.sum(1), RTOL32, "resnet18 deeplift vs Captum DeepLift (Clone)")


# --------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------
def _completeness_error(net, method):
    """|Σ attributions − (f(x) − f(x₀))| and a float32 rounding scale Σ|a| + |f(x)| + |f(x₀)|."""
    a = net.out[method]
    fx, f0 = net.f(net.x), net.f(net.x0)
    err = np.abs(a.sum((1, 2)) - (fx - f0))
    scale = np.abs(a).sum((1, 2)) + np.abs(fx) + np.abs(f0)
    return err, scale


@pytest.mark.parametrize("which", NETS)
def test_deeplift_is_complete(which, request):
    net = request.getfixturevalue(which)
    err, scale = _completeness_error(net, "deeplift")
    print(f"[deeplift/ig] {net.name} deeplift Σ − Δf: {err} (scale {scale})")
    assert np.all(err < 1e3 * EPS32 * scale), (err, scale)
    # Captum's hook order is not complete for a reference whose pooled values move the argmax
    err_captum, _ = _completeness_error(net, "deeplift_captum")
    assert np.all(err_captum > 1e3 * err), (err_captum, err)


def test_captum_clone_run_is_not_complete_with_overlapping_windows(resnet18):
    net = resnet18
    ref = refs.captum_deeplift(refs.captum_ready(net.module), net.x, net.target, net.x0)
    fx, f0 = net.f(net.x), net.f(net.x0)
    captum_err = np.abs(ref.sum((1, 2, 3)) - (fx - f0))
    ours_err, _ = _completeness_error(net, "deeplift")
    assert np.all(captum_err > 1e3 * ours_err), (captum_err, ours_err)


def _small_net(pool):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), pool,
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


def test_deeplift_is_complete_in_float64():
    """Float64 (graph cast to float64, run by onnx.reference): Σ = f(x) − f(x₀) to rounding."""
    from precision import to_float64
    net = _small_net(torch.nn.MaxPool2d(3, 2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net[1].running_mean.uniform_(-0.3, 0.3)
    model = to_float64(export(net, torch.zeros(1, 3, 12, 12)))
    rng = np.random.default_rng(3)
    x, x0 = rng.standard_normal((2, 3, 12, 12)), rng.standard_normal((2, 3, 12, 12))
    target = np.array([1, 4])
    conv = dconnx.convert(model, methods="deeplift", check=False).model
    out = run(conv, x, target=target, reference=x0)
    f0 = run(conv, x0, target=target)["logits"][[0, 1], target]
    df = out["logits"][[0, 1], target] - f0
    err = np.abs(out["deeplift"].sum((1, 2)) - df).max()
    print(f"[deeplift/ig] float64 deeplift |Σ − Δf| = {err:.2e} (Δf {df})")
    assert err < 1e-12 * np.abs(df).max()


def _path_gradients(net, x, x0, target, points):
    """φ'(a) = ∇f_k(x₀ + a(x − x₀))·(x − x₀) at each point a, float64 autograd, [len(points), B]."""
    net = net.double()
    d = torch.tensor(x - x0)
    a = torch.tensor(points).reshape(-1, 1, 1, 1, 1)
    z = (torch.tensor(x0)[None] + a * d[None]).reshape(-1, *x.shape[1:]).requires_grad_()
    out = net(z).reshape(len(points), len(target), -1)
    out[:, np.arange(len(target)), target].sum().backward()
    return (z.grad.reshape(len(points), *x.shape) * d[None]).sum((2, 3, 4)).numpy()


def _discrepancy(points, weights) -> float:
    """Star discrepancy of the weighted points: sup_t |Σ_{a_i ≤ t} w_i − t| (both one-sided
    limits at every point, and t = 1), the constant of the 1-D Koksma inequality
    |Σ_i w_i g(a_i) − ∫₀¹ g| ≤ TV(g)·D* for weights ≥ 0 summing to 1."""
    order = np.argsort(points)
    a, w = np.asarray(points)[order], np.asarray(weights)[order]
    right = np.cumsum(w) / np.sum(w)
    return float(max(np.abs(right - a).max(), np.abs(right - w / np.sum(w) - a).max()))


@pytest.fixture(scope="module")
def small_path():
    """The small net, its export, an input and TV(φ') of its path gradient on a 1025-point grid."""
    net = _small_net(torch.nn.MaxPool2d(2, 2))
    model = export(net, torch.zeros(1, 3, 16, 16))
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    target = np.array([0, 2])
    x64 = x.astype(np.float64)
    import copy
    grid = _path_gradients(copy.deepcopy(net), x64, np.zeros_like(x64), target, np.linspace(0, 1, 1025))
    return net, model, x, target, np.abs(np.diff(grid, axis=0)).sum(0), np.abs(grid).max(0)


@pytest.mark.parametrize("method", IG_METHODS)
def test_ig_quadratures_equal_captum_and_stay_within_the_step_error(method, small_path):
    """Every `method` against Captum (same n_steps, zero reference: the default); Σ IG − Δf
    within TV(φ')·D* + |1 − Σw|·max|φ'|, φ'(a) = ∇f_k(a·x)·x on a float64 grid, D* the
    discrepancy of Captum's points and weights for this method and n (1/n for the left and
    right sums; Captum's trapezoid weights sum to 1 − 1/n)."""
    from captum.attr._utils.approximation_methods import approximation_parameters
    net, model, x, target, tv, gmax = small_path
    n = 12
    conv = dconnx.convert(model, methods="ig", ig_steps=n, ig_method=method).model
    out = run(conv, x, target=target)
    ref = refs.captum_ig(net, x, target, n, method)
    _close(out["ig"], ref.sum(1), RTOL32, f"small net ig {method}")
    step_sizes, alphas = approximation_parameters(method)
    missing = abs(1.0 - float(np.sum(step_sizes(n))))
    bound = tv * _discrepancy(alphas(n), step_sizes(n)) + missing * gmax
    zero = run(conv, np.zeros_like(x), target=target)["logits"][[0, 1], target]
    df = out["logits"][[0, 1], target] - zero
    err = np.abs(out["ig"].sum((1, 2)) - df)
    print(f"[deeplift/ig] {method}: |Σ IG − Δf| = {err}, bound {bound}")
    assert np.all(err <= bound + 1e-5 * np.abs(df)), (err, bound)
    if method != "riemann_trapezoid":       # as fine as a Riemann sum (Captum: float32 points)
        assert missing < 1e-6 and _discrepancy(alphas(n), step_sizes(n)) <= 1.0 / n + 1e-6


def test_ig_error_shrinks_with_the_step_count(small_path):
    """Gauss-Legendre on a piecewise-linear path: the error at 64 steps is below the one at 4."""
    _, model, x, target, _, _ = small_path
    errs = {}
    for n in (4, 64):
        out = run(dconnx.convert(model, methods="ig", ig_steps=n).model, x, target=target)
        zero = run(dconnx.convert(model, methods=()).model, np.zeros_like(x))["logits"]
        df = out["logits"][[0, 1], target] - zero[[0, 1], target]
        errs[n] = np.abs(out["ig"].sum((1, 2)) - df)
    print(f"[deeplift/ig] gausslegendre error by steps: {errs}")
    assert np.all(errs[64] < errs[4])


# --------------------------------------------------------------------------
# The reference input, options, names
# --------------------------------------------------------------------------
def test_default_reference_is_zero_and_can_be_a_constant():
    net = _small_net(torch.nn.MaxPool2d(2, 2))
    model = export(net, torch.zeros(1, 3, 16, 16))
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    target = np.array([0, 3])
    clean = refs.captum_ready(net)
    for value in (0.0, 0.25):
        conv = dconnx.convert(model, methods="deeplift", reference=value).model
        ref = refs.captum_deeplift(clean, x, target, value)
        _close(run(conv, x, target=target)["deeplift"], ref.sum(1), RTOL32, f"deeplift reference {value}")
    ref_input = next(i for i in conv.graph.input if i.name == "reference")
    assert len(ref_input.type.tensor_type.shape.dim) == 4


def test_hidden_layer_and_bad_options_are_refused(small_path):
    model = small_path[1]
    for method in ("deeplift", "deeplift_captum", "ig"):
        with pytest.raises(DconnxError, match="input only"):
            dconnx.convert(model, methods=method, layer=1)
    with pytest.raises(DconnxError, match="ig_steps"):
        dconnx.convert(model, methods="ig", ig_steps=1, ig_method="riemann_left")
    with pytest.raises(DconnxError, match="ig_method"):
        dconnx.convert(model, methods="ig", ig_method="simpson")


def test_cli_convert_and_methods(tmp_path):
    net = _small_net(torch.nn.MaxPool2d(2, 2))
    src = tmp_path / "small.onnx"
    onnx.save(export(net, torch.zeros(1, 3, 16, 16)), str(src))
    dst = tmp_path / "small.dc.onnx"
    cmd = [sys.executable, "-m", "dconnx"]
    done = subprocess.run(cmd + ["convert", str(src), "-o", str(dst), "--methods", "deeplift,ig",
                                 "--ig-steps", "6", "--ig-method", "riemann_middle", "--reference", "0.1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(8).standard_normal((1, 3, 16, 16)).astype(np.float32)
    out = run(onnx.load(str(dst)), x, target=np.array([2]))
    _close(out["ig"], refs.captum_ig(net, x, [2], 6, "riemann_middle", 0.1).sum(1), RTOL32, "CLI ig")
    _close(out["deeplift"], refs.captum_deeplift(refs.captum_ready(net), x, [2], 0.1).sum(1), RTOL32,
           "CLI deeplift")
    bad = subprocess.run(cmd + ["convert", str(src), "-o", str(tmp_path / "bad.onnx"), "--methods", "ig",
                                "--ig-steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ig_steps" in bad.stderr
    listed = subprocess.run(cmd + ["methods"], capture_output=True, text=True).stdout
    for m in ("deeplift", "deeplift_captum", "ig"):
        assert f"\n{m}\n" in "\n" + listed and METHODS[m].matches in listed
    for p in ("reference", "ig_steps", "ig_method"):
        assert p in listed
