"""convert's float-resolution probe: g − h against the logits on a probe input, without
recentering or in float16."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import dconnx
from dconnx import probe as probe_mod
from dconnx.cli import main
from dconnx.runtime import NumericalWarning
from helpers import export, run


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory):
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.squeezenet1_1(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("probe") / "squeezenet.onnx"
    path.write_bytes(export(m, torch.randn(1, 3, 64, 64)).SerializeToString())
    return path


def test_unresolved_g_and_h_warn_loudly_without_recentering(squeezenet):
    with pytest.warns(NumericalWarning, match="cannot resolve") as caught:
        res = dconnx.convert(squeezenet, stabilize="none", maxpool="dc")
    assert "--stabilize recenter" in str(caught[0].message)
    # the warning is true: g − h really misses the logits on an input of the model
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = run(res.model, x)
    err = np.abs(out["g"] - out["h"] - out["logits"]).max() / np.abs(out["logits"]).max()
    assert err > probe_mod.RESOLVED
    assert any(n.startswith("probe:") for n in res.report.notes)


def test_recentered_conversion_needs_no_probe(squeezenet):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        res = dconnx.convert(squeezenet, maxpool="dc")
    assert not any(n.startswith("probe:") for n in res.report.notes)
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = run(res.model, x)
    assert np.abs(out["g"] - out["h"] - out["logits"]).max() <= 1e-5 * np.abs(out["logits"]).max()


def test_resolved_model_passes_the_probe_quietly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        res = dconnx.convert(export(m, torch.randn(1, 3, 8, 8)), stabilize="none")
    note = next(n for n in res.report.notes if n.startswith("probe:"))
    measured = float(note.split("by ")[1].split(" ")[0])
    assert measured <= probe_mod.RESOLVED


def test_unresolved_recentered_conversion_is_refused_and_nothing_written(squeezenet, tmp_path, monkeypatch):
    """With recentering (float16 here, reported unresolved), an unresolved g − h is refused
    rather than warned about."""
    monkeypatch.setattr(probe_mod, "probe", lambda model, explained, seed=0: (0.5, 1e30))
    out = tmp_path / "m.dc.onnx"
    with pytest.raises(dconnx.DconnxError, match="cannot resolve"):
        dconnx.convert(squeezenet, out, precision="float16")
    assert not out.exists()


def test_cli_prints_the_warning_and_writes(squeezenet, tmp_path, capsys):
    out = tmp_path / "s.dc.onnx"
    code = main(["convert", str(squeezenet), "-o", str(out), "--stabilize", "none", "--maxpool", "dc"])
    assert code == 0 and out.exists()
    assert "cannot resolve" in capsys.readouterr().err
