"""Dense (segmentation) outputs [batch, classes, H, W]: the explained scalar is the target class
summed over the `region` input (pytorch-grad-cam's SemanticSegmentationTarget convention).

g − h equals that region-summed logit; at α = 0.5 SplitGrad equals half the autograd gradient
of it (float64 torch reference, tolerance from the measured float32 error of the same gradient);
every method converts with the dense seed; `explain --region` writes its outputs and a region
of the wrong size exits 2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dconnx.api import compile_model
from dconnx.cli import main
from dconnx.methods import METHODS
from dconnx.runtime import Explainer
from helpers import export, rel_err, run

SIZE = 16


class UNet(nn.Module):
    """Two levels: MaxPool down, ConvTranspose up, skip Concat, 1x1 class head."""

    def __init__(self, c=3, k=4, w=6):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.e2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.d = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, k, 1))

    def forward(self, x):
        a = self.e1(x)
        return self.d(torch.cat([self.up(self.e2(a)), a], 1))


def _random_bn(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def converted_unet_file(directory, size: int, methods: str):
    """The U-Net (seeded weights, randomized BatchNorm) converted with `methods` for a size×size
    input, written to directory/unet.dc.onnx (the page and serve tests' dense model)."""
    import warnings

    import dconnx
    torch.manual_seed(0)
    net = _random_bn(UNet(), 1)
    x = np.random.RandomState(0).randn(1, 3, size, size).astype(np.float32)
    out = directory / "unet.dc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the CAMs at the input layer: fine here
        dconnx.convert(export(net, torch.tensor(x)), out, methods=methods)
    return out


@pytest.fixture(scope="session")
def unet():
    torch.manual_seed(0)
    net = _random_bn(UNet(), 1)
    x = np.random.RandomState(0).randn(2, 3, SIZE, SIZE).astype(np.float32)
    onx = export(net, torch.tensor(x))
    with pytest.warns(UserWarning, match="at the input layer"):    # the CAMs at the input: fine here
        conv, report = compile_model(onx, methods=",".join(METHODS), debug=True)
    return net, x, onx, conv, report


def _box() -> np.ndarray:
    r = np.zeros((2, SIZE, SIZE), np.float32)
    r[0, 2:9, 3:12] = 1
    r[1, 5:16, 0:7] = 1
    return r


def _region_logit_and_grad(net, x, target, region, dtype):
    """The region-summed logit of the target class and its autograd gradient, in dtype."""
    net = net.to(dtype)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    y = net(xt)
    r = torch.as_tensor(region, dtype=dtype)[:, None]
    s = (y * r)[torch.arange(len(x)), torch.as_tensor(target)].sum((1, 2))
    s.sum().backward()
    net.float()
    return s.detach().numpy().astype(np.float64), xt.grad.numpy().astype(np.float64)


@pytest.mark.parametrize("kind", ["full", "box"])
def test_unet_g_minus_h_and_half_gradient(unet, kind):
    net, x, _, conv, report = unet
    assert any("dense output" in n for n in report.notes)
    region = np.ones((2, SIZE, SIZE), np.float32) if kind == "full" else _box()
    target = np.array([1, 3])
    feed = {} if kind == "full" else {"region": region}   # the default region is every position
    out = run(conv, x, target=target, alpha=0.5, **feed)
    assert out["g"].shape == out["h"].shape == (2, 4)
    s64, grad64 = _region_logit_and_grad(net, x, target, region, torch.float64)
    s32, grad32 = _region_logit_and_grad(net, x, target, region, torch.float32)
    tol_s = max(10 * rel_err(s32, s64), 1e-6)
    assert rel_err((out["g"] - out["h"])[[0, 1], target], s64) < tol_s
    tol_g = max(10 * rel_err(grad32, grad64), 1e-5)
    assert rel_err(out["splitgrad"], 0.5 * grad64.sum(1)) < tol_g
    assert rel_err(out["gradient"], grad64.sum(1)) < tol_g
    # the box changes the scalar: the region really enters the seed
    if kind == "box":
        full, _ = _region_logit_and_grad(net, x, target, np.ones_like(region), torch.float64)
        assert rel_err(s64, full) > 1e-3


def test_every_method_runs_with_the_dense_seed(unet):
    _, x, _, conv, _ = unet
    out = run(conv, x, alpha=0.35, region=_box())
    for m in METHODS:
        assert out[m].shape == (2, SIZE, SIZE) and np.all(np.isfinite(out[m])), m
        assert np.abs(out[m]).max() > 0, m


def test_default_target_is_the_largest_region_sum(unet, tmp_path):
    net, x, _, conv, _ = unet
    path = tmp_path / "u.onnx"
    path.write_bytes(conv.SerializeToString())
    ex = Explainer(path)
    assert ex.n_classes == 4
    res = ex.maps(x, region="3,2,12,9")
    box = np.zeros((SIZE, SIZE), np.float32)
    box[2:9, 3:12] = 1
    y = net(torch.tensor(x)).detach().numpy().astype(np.float64)
    scores = (y * box).sum((2, 3))
    np.testing.assert_array_equal(res.target, scores.argmax(1))
    assert rel_err(res.scores, scores) < 1e-5
    with pytest.raises(Exception) as e:
        ex.maps(x, region=np.ones((SIZE, SIZE + 1), np.float32))
    assert "region" in str(e.value) and type(e.value).__module__ == "dconnx.errors"


def test_cli_explain_region(unet, tmp_path, capsys):
    _, x, _, conv, _ = unet
    model = tmp_path / "u.onnx"
    model.write_bytes(conv.SerializeToString())
    img = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(1).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)).save(img)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:10, 4:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["explain", str(model), str(img), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
            "--methods", "splitgrad"]
    assert main(base + ["-o", str(tmp_path / "box.png"), "--region", "3,2,12,9", "--target", "2"]) == 0
    assert (tmp_path / "box.png").is_file() and np.load(tmp_path / "box.npy").shape == (SIZE, SIZE)
    assert main(base + ["-o", str(tmp_path / "m.png"), "--region", str(tmp_path / "mask.png")]) == 0
    assert (tmp_path / "m.npy").is_file()
    bad = np.zeros((SIZE + 2, SIZE), np.uint8)
    Image.fromarray(bad).save(tmp_path / "bad.png")
    capsys.readouterr()
    assert main(base + ["-o", str(tmp_path / "b.png"), "--region", str(tmp_path / "bad.png")]) == 2
    assert "not resized" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "b.png"), "--region", "9,9,3,3"]) == 2
