"""`dconnx eval`: a reduced benchmark run on the trained fixture (files, table, time),
the other data sources, and the progress bar."""
import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest

from dconnx.cli import main
from dconnx.eval.progress import Progress

MODEL = Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx"


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_reduced_benchmark_writes_table_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "ev"
    t0 = time.perf_counter()
    rc = main(["eval", str(MODEL), "--data", "synthetic", "--n", "8", "--layers", "0,11",
               "--methods", "splitgrad,splitcam,gradient,guidedbp,lrp_zplus", "--alphas", "0.35,0.5",
               "--max-sens-samples", "2", "--sanity-n", "3", "--sanity-layers", "11",
               "--csc-methods", "gradient,guidedbp,splitgrad",
               "--gallery", "2", "--threads", "2", "-q", "-o", str(out)])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    assert elapsed < 300, f"the reduced benchmark took {elapsed:.0f} s"
    text = capsys.readouterr().out
    for head in ("Pointing↑", "AttrLoc↑", "MaxSens↓", "PixelFl@20↓", "Select.↓", "MPRT-SSIM↓",
                 "RandLogit-SSIM↓", "CSC: median |cos|"):
        assert head in text
    rows = _rows(out / "results.csv")
    # 2 layers x (splitgrad, splitcam at 2 alphas + 3 alpha-free methods)
    assert len(rows) == 2 * (2 * 2 + 3)
    for r in rows:
        cols = ("pointing", "attrloc", "maxsens", "pixelflip", "selectivity")
        cols += ("mprt", "logit") if r["layer"] == "11" else ()
        for col in cols:
            v = float(r[col])
            assert np.isfinite(v), (r, col)
        if r["layer"] == "0":
            assert r.get("mprt", "") == ""
        assert 0 <= float(r["pointing"]) <= 1 and 0 <= float(r["attrloc"]) <= 1
        assert 0 <= float(r["pixelflip"]) <= 19 and 0 <= float(r["selectivity"]) <= 63
    # at alpha = 0.5 SplitGrad is half the gradient: every metric equals the gradient's
    by = {(r["method"], r["layer"], r["alpha"]): r for r in rows}
    for layer in ("0", "11"):
        for col in ("pointing", "attrloc", "maxsens", "pixelflip", "selectivity"):
            assert float(by[("splitgrad", layer, "0.5")][col]) == pytest.approx(
                float(by[("gradient", layer, "")][col]), abs=1e-5)
    mprt = _rows(out / "mprt.csv")
    stages = {r["randomized_down_to"] for r in mprt}
    assert "original" in stages and "classifier (Gemm)" in stages and "features.0 (Conv)" in stages
    csc = _rows(out / "csc.csv")
    assert {r["layer"] for r in csc} == {"0", "3", "6", "8", "11"}
    assert {r["method"] for r in csc} == {"gradient", "guidedbp", "splitgrad"}
    for name in ("alpha_sweep.png", "csc.png", "mprt.png", "gallery.png"):
        p = out / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size < 1_000_000
    assert (out / "config.json").is_file() and (out / "random_logit.csv").is_file()


def test_folder_and_npz_data(tmp_path, capsys):
    from PIL import Image

    from dconnx.eval.synthetic import denormalize, make_dataset
    x, y, masks = make_dataset(3, seed=1)
    folder = tmp_path / "imgs"
    (folder / "masks").mkdir(parents=True)
    rgb = (np.moveaxis(denormalize(x), 1, -1) * 255).round().astype(np.uint8)
    lines = []
    for i in range(3):
        Image.fromarray(rgb[i]).save(folder / f"im{i}.png")
        Image.fromarray(masks[i].astype(np.uint8) * 255).save(folder / "masks" / f"im{i}.png")
        lines.append(f"im{i}.png,{y[i]}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "set.npz", x=x, y=y, masks=masks)
    common = ["--layers", "11", "--methods", "gradient,splitgrad", "--alphas", "0.4", "--metrics",
              "pointing,attrloc", "--sanity", "none", "--gallery", "0", "--no-plots", "-q",
              "--mean", "0.455,0.455,0.455", "--std", "0.236,0.236,0.236"]
    results = []
    for data in (str(folder), str(tmp_path / "set.npz")):
        out = tmp_path / Path(data).stem
        assert main(["eval", str(MODEL), "--data", data, "-o", str(out)] + common) == 0
        results.append(_rows(out / "results.csv"))
    assert "targets: labels" in capsys.readouterr().out
    # the PNG round trip (8-bit) hardly changes the localization scores
    for a, b in zip(*results):
        assert abs(float(a["attrloc"]) - float(b["attrloc"])) < 0.05


def test_progress_bar():
    buf = io.StringIO()
    with Progress(4, "work", stream=buf, force=True) as p:
        for _ in range(4):
            p()
    text = buf.getvalue()
    assert "work" in text and "4/4" in text and text.endswith("\n")
    quiet = io.StringIO()
    with Progress(4, "work", stream=quiet) as p:        # not a TTY: silent
        p()
    assert quiet.getvalue() == ""
