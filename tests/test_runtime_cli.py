"""Explainer (batched numpy in, dict of maps out) and `dconnx explain` (PNG + .npy)."""
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import dconnx
from dconnx.cli import main
from dconnx.runtime import Explainer
from helpers import export


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    d = tmp_path_factory.mktemp("rt")
    src = d / "net.onnx"
    onnx.save(export(m, torch.zeros(1, 3, 32, 32)), src)
    out = d / "net.dc.onnx"
    dconnx.convert(src, out, methods="splitgrad,splitcam,splitlrp", layer=3)
    return m, src, out


def test_explainer_batches_and_reports_provider(converted):
    m, _, path = converted
    ex = Explainer(path)
    assert ex.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert ex.methods == ["splitgrad", "splitcam", "splitlrp"]
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    maps = ex.maps(x)
    assert set(maps) == {"splitgrad", "splitcam", "splitlrp"}
    for v in maps.values():
        assert v.shape == (5, 32, 32)
    # one sample at a time gives the same maps as the batch
    single = ex.maps(x[2])
    for k in maps:
        assert np.allclose(single[k][0], maps[k][2], atol=1e-5)
    out = ex(x)
    logits = m(torch.tensor(x)).detach().numpy()
    assert np.allclose(out["logits"], logits, atol=1e-5)


def test_io_binding_gives_the_same_outputs(converted):
    """IO binding (on by default for CUDA) binds inputs and outputs to the provider's device;
    on the CPU it must return exactly what a plain run returns, for every output."""
    _, _, path = converted
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    plain, bound = Explainer(path, io_binding=False), Explainer(path, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    assert Explainer(path).io_binding == (Explainer(path).provider == "CUDAExecutionProvider")
    a, b = plain(x, target=[1, 0, 3, 2], alpha=0.4), bound(x, target=[1, 0, 3, 2], alpha=0.4)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    with pytest.raises(dconnx.DconnxError, match="io_binding"):
        Explainer(path, io_binding="sometimes")


def test_target_and_alpha_inputs_change_the_maps(converted):
    _, _, path = converted
    ex = Explainer(path)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    base = ex(x)
    argmax = base["logits"].argmax(1)
    same = ex(x, target=argmax)
    assert np.allclose(same["splitgrad"], base["splitgrad"])
    other = ex(x, target=(argmax + 1) % 4)
    assert not np.allclose(other["splitgrad"], base["splitgrad"])
    a0, a5 = ex(x, alpha=0.0), ex(x, alpha=0.5)
    assert not np.allclose(a0["splitgrad"], a5["splitgrad"])
    assert np.allclose(ex(x, alpha=0.35)["splitgrad"], base["splitgrad"])   # 0.35 is the default


def test_explainer_rejects_bad_data(converted):
    _, _, path = converted
    ex = Explainer(path)
    good = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(dconnx.InputError, match="shape"):
        ex(np.zeros((2, 3, 16, 16), np.float32))
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(dconnx.InputError, match="NaN"):
        ex(bad)
    with pytest.raises(dconnx.InputError, match="floating"):
        ex(good.astype(np.int32))
    with pytest.raises(dconnx.InputError, match="outside"):
        ex(good, target=7)
    with pytest.raises(dconnx.InputError, match="alpha"):
        ex(good, alpha=0.9)


def test_explainer_refuses_unconverted_model(converted):
    _, src, _ = converted
    with pytest.raises(dconnx.InvalidModelError, match="not produced by"):
        Explainer(src)


def test_cli_explain_writes_png_and_npy(converted, tmp_path, capsys):
    _, _, path = converted
    rng = np.random.default_rng(3)
    img = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    img[10:30, 10:20] = [255, 0, 0]
    image = tmp_path / "photo.png"
    Image.fromarray(img).save(image)
    out = tmp_path / "heat.png"
    assert main(["explain", str(path), str(image), "-o", str(out), "--target", "1"]) == 0
    printed = capsys.readouterr().out
    assert "explained class 1" in printed
    with Image.open(out) as pic:
        arr = np.asarray(pic.convert("RGB"), dtype=np.float64)
        assert pic.size[0] > pic.size[1] > 32            # a panel: input and three overlays side by side
    assert arr.std() > 10                                # not blank
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50
    for method in ("splitgrad", "splitcam", "splitlrp"):
        raw = np.load(tmp_path / f"heat.{method}.npy")
        assert raw.shape == (32, 32) and np.isfinite(raw).all() and np.abs(raw).max() > 0


def test_cli_explain_bad_image(converted, tmp_path, capsys):
    _, _, path = converted
    bogus = tmp_path / "bogus.png"
    bogus.write_text("not an image")
    out = tmp_path / "heat.png"
    assert main(["explain", str(path), str(bogus), "-o", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not out.exists()


def test_session_threads_from_the_environment(monkeypatch):
    """DCONNX_THREADS sets the intra-op threads where the caller gives none; a given count wins;
    a value that is not a count is refused by name; unset, onnxruntime's default (0: one per core)."""
    from dconnx.runtime import THREADS_ENV, session_options
    monkeypatch.setenv(THREADS_ENV, "3")
    assert session_options().intra_op_num_threads == 3
    assert session_options(threads=1).intra_op_num_threads == 1
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(dconnx.OptionError, match="DCONNX_THREADS='two'"):
        session_options()
    monkeypatch.delenv(THREADS_ENV)
    assert session_options().intra_op_num_threads == 0
