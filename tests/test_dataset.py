"""`dconnx explain-dataset` on a small folder of PNGs: chunked output equal to the Explainer,
unreadable files recorded, --resume, the CLI, and the Ray Data engine on a local Ray instance."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dconnx
from dconnx.dataset import explain_dataset, load_chunks
from dconnx.errors import InputError, OptionError
from dconnx.images import ImageInput
from dconnx.runtime import Explainer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
METHODS = ["splitgrad", "splitcam", "splitlrp"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods=",".join(METHODS), layer=10,
                   mean=(0.455,) * 3, std=(0.236,) * 3)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """11 PNGs (two in a subfolder, two not 64x64) and one file that only looks like a PNG."""
    from PIL import Image
    from dconnx.eval.synthetic import denormalize, make_dataset
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    x, _, _ = make_dataset(11, seed=3)
    for i in range(11):
        rgb = (np.clip(np.moveaxis(denormalize(x[i]), 0, -1), 0, 1) * 255).astype(np.uint8)
        im = Image.fromarray(rgb)
        if i in (4, 9):
            im = im.resize((80, 72))
        im.save(root / ("sub" if i % 5 == 1 else ".") / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def reference(model, folder):
    ex = Explainer(model)
    images = ImageInput.from_explainer(ex)
    files = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")
    x = np.stack([images.load(p)[0] for p in files])
    return [p.relative_to(folder).as_posix() for p in files], ex(x)


def test_chunks_equal_explainer(model, folder, tmp_path):
    run = explain_dataset(model, folder, tmp_path / "out", batch_size=3, chunk_size=4, progress=False)
    assert run.images == 12 and run.explained == 11 and len(run.chunks) == 3
    assert [f["file"] for f in run.failed] == ["broken.png"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["chunk-00000.npz", "chunk-00001.npz", "chunk-00002.npz", "manifest.json"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["methods"] == METHODS and manifest["chunk_size"] == 4 and manifest["images"] == 12
    assert [c["count"] for c in manifest["chunks"]] == [4, 4, 4]
    assert manifest["failed"][0]["file"] == "broken.png" and manifest["failed"][0]["error"]
    with np.load(tmp_path / "out" / "chunk-00000.npz") as c0:
        assert c0["splitcam"].shape == (3, 64, 64) and c0["splitcam"].dtype == np.float32   # broken.png left out
    files, ref = reference(model, folder)
    got = load_chunks(tmp_path / "out")
    assert got["files"].tolist() == files
    for m in METHODS:
        np.testing.assert_allclose(got[m], ref[m], rtol=1e-5, atol=1e-6 * np.abs(ref[m]).max())
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert got["target"].tolist() == ref["logits"].argmax(-1).tolist()


def test_target_alpha_and_resume(model, folder, tmp_path):
    out = tmp_path / "out"
    run = explain_dataset(model, folder, out, batch_size=5, chunk_size=5, target=2, alpha=0.2, progress=False)
    assert len(run.chunks) == 3
    files, _ = reference(model, folder)
    ex = Explainer(model)
    x = np.stack([ImageInput.from_explainer(ex).load(folder / f)[0] for f in files])
    got = load_chunks(out)
    assert set(got["target"].tolist()) == {2}
    np.testing.assert_allclose(got["splitgrad"], ex.maps(x, target=2, alpha=0.2)["splitgrad"], rtol=1e-5,
                               atol=1e-6)
    # drop the middle chunk: --resume rewrites only that one
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.npz")}
    (out / "chunk-00001.npz").unlink()
    again = explain_dataset(model, folder, out, batch_size=5, chunk_size=5, target=2, alpha=0.2, resume=True,
                            progress=False)
    assert again.skipped_chunks == 2 and [p.name for p in again.chunks] == ["chunk-00001.npz"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.npz") if p.name != "chunk-00001.npz"} == \
        {k: v for k, v in stamp.items() if k != "chunk-00001.npz"}
    np.testing.assert_array_equal(load_chunks(out)["splitgrad"], got["splitgrad"])
    with pytest.raises(OptionError, match="chunk size"):
        explain_dataset(model, folder, out, chunk_size=4, resume=True, progress=False)


def test_refusals(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        explain_dataset(model, tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="no image folder"):
        explain_dataset(model, tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(OptionError, match="engine"):
        explain_dataset(model, tmp_path / "empty", tmp_path / "out", engine="spark", progress=False)


def test_cli_with_progress_bar(model, folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dconnx", "explain-dataset", str(model), str(folder),
                           "-o", str(tmp_path / "maps"), "--chunk-size", "8", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "explained 11 of 12 images" in proc.stdout and "1 unreadable" in proc.stdout
    assert "12/12" in proc.stderr          # the progress bar reached the end
    assert len(list((tmp_path / "maps").glob("chunk-*.npz"))) == 2


RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(not RAY, reason="Ray is not installed (the `ray` extra, part of `test`): "
                    "pip install '.[ray]' to run this test")
def test_ray_engine_equals_local(model, folder, tmp_path):
    """`--engine ray` on a local Ray instance (started and stopped by the command, in a subprocess)."""
    local = explain_dataset(model, folder, tmp_path / "local", batch_size=4, chunk_size=4, progress=False)
    proc = subprocess.run([sys.executable, "-m", "dconnx", "explain-dataset", str(model), str(folder),
                           "-o", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "1", "--batch-size", "4",
                           "--chunk-size", "4", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"explained {local.explained} of 12 images" in proc.stdout
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["engine"] == "ray" and manifest["failed"][0]["file"] == "broken.png"
    a, b = load_chunks(tmp_path / "local"), load_chunks(tmp_path / "ray")
    assert a.keys() == b.keys() and a["files"].tolist() == b["files"].tolist()
    for k in ("target", "index"):
        np.testing.assert_array_equal(a[k], b[k])
    for k in ["logits", *METHODS]:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6 * max(1.0, np.abs(a[k]).max()))


def test_ray_engine_without_ray_is_a_clear_error(model, folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # as if not installed
    with pytest.raises(OptionError, match=r"dconnx\[ray\]"):
        explain_dataset(model, folder, tmp_path / "out", engine="ray", progress=False)
