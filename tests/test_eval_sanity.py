"""Sanity checks on the trained fixture model (models/fixture_cnn.onnx), asserting the
direction that Sixt et al. (2020) predict: cascading parameter randomization changes the
gradient's and SplitGrad's maps but hardly Guided Backprop's while the top layers are
randomized; injected random relevance converges (rank-1) under Guided Backprop and
LRP-z⁺ within the convolutional stack, not under the gradient."""
from pathlib import Path

import numpy as np
import pytest

from dconnx.eval import metrics as M
from dconnx.eval.benchmark import default_csc_layers
from dconnx.eval.randomize import cascade, parameter_layers
from dconnx.eval.runner import Attributor, chain_layers
from dconnx.eval.synthetic import MEAN, STD, make_dataset

MODEL = Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx"
N = 6


@pytest.fixture(scope="module")
def fixture():
    att = Attributor(MODEL, threads=2, convert_options={"mean": tuple(map(float, MEAN)), "std": tuple(map(float, STD))})
    x, y, _ = make_dataset(N, seed=1)
    return att, x, y


def test_cascading_randomization_gradient_drops_guided_backprop_stays(fixture):
    att, x, y = fixture
    methods = ("gradient", "splitgrad", "guidedbp")
    layers = parameter_layers(att.model)
    assert [l.op_type for l in layers[-3:]] == ["Conv", "BatchNormalization", "Gemm"]
    orig = att.maps(x, y, methods, None, alpha=0.35)
    ssim = {m: [] for m in methods}
    stages = []
    for layer, model in cascade(att.model, seed=42):
        rand = att.with_model(model).maps(x, y, methods, None, alpha=0.35)
        stages.append(layer.label)
        for m in methods:
            ssim[m].append(M.ssim_flipped(orig[m], rand[m]).mean())
        if len(stages) == 3:          # classifier, the last BatchNorm and the last Conv are random
            break
    assert stages[-1] == "features.15 (Conv)"
    # the maps of a network are not those of the network with random top layers ...
    for m in ("gradient", "splitgrad"):
        assert ssim[m][-1] < 0.6, (m, ssim)
        assert ssim[m][-1] < ssim[m][0]
    # ... but Guided Backprop's hardly notice (it reconstructs the image)
    assert ssim["guidedbp"][-1] > 0.8, ssim
    for k in range(len(stages)):
        assert ssim["guidedbp"][k] > max(ssim["gradient"][k], ssim["splitgrad"][k]), ssim


def test_csc_converges_for_guided_backprop_and_zplus_not_for_the_gradient(fixture):
    att, x, _ = fixture
    inject, lower = default_csc_layers(chain_layers(att.model))
    assert inject == "13" and lower == ("0", "3", "6", "8", "11")
    conv_stack = ["11", "8", "6", "3"]                   # top to bottom, without the 3-channel input
    n_vec = 2
    x_t = np.repeat(x, n_vec, axis=0)
    shape = att.inject_shape(inject)
    v = np.random.default_rng(0).standard_normal((len(x_t), *shape[1:])).astype(np.float32)
    out = att.vectors(x_t, v, ["gradient", "guidedbp", "lrp_zplus"], inject, conv_stack)
    csc = {m: [M.csc_summary(M.location_cosines(out[f"{m}@{l}"].reshape(N, n_vec, *out[f"{m}@{l}"].shape[1:])))
               ["median"] for l in conv_stack] for m in ("gradient", "guidedbp", "lrp_zplus")}
    for m in ("guidedbp", "lrp_zplus"):
        # convergence: the similarity grows on the way down and approaches 1
        assert csc[m][-1] > 0.95, csc
        assert csc[m][-1] >= csc[m][0], csc
    for k in range(len(conv_stack)):
        assert csc["gradient"][k] < 0.6, csc
        assert csc["gradient"][k] < csc["guidedbp"][k], csc
    assert csc["gradient"][-1] < csc["lrp_zplus"][-1] - 0.3, csc
