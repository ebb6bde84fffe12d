"""The benchmark's smoke run (`make bench-quick`) and the PyTorch split implementation it
times: no timing assertions, only that the run writes well-formed tables and that
benchmarks/torch_split.py computes the maps dconnx computes."""
import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import dconnx
from dconnx.runtime import make_session

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from benchmarks.run import make_input, torch_model  # noqa: E402
from benchmarks.torch_split import TorchSplit  # noqa: E402

FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
REQUIRED = {"ort_forward", "ort_gradient", "splitgrad", "splitcam", "splitlrp", "split_all3",
            "torch_split_splitgrad", "torch_split_splitlrp", "zennit_lrp_epsilon",
            "captum_layergradcam", "gradcam_layercam"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--models", "fixture",
                           "--batches", "2", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_quick_run_writes_well_formed_tables(quick_run):
    rows = list(csv.DictReader(open(quick_run / "results.csv")))
    got = {r["candidate"]: r for r in rows}
    assert REQUIRED <= set(got), sorted(got)
    for name in REQUIRED:
        r = got[name]
        assert (r["model"], r["batch"], r["device"]) == ("fixture", "2", "cpu")
        assert float(r["median_s"]) > 0 and int(r["n_rounds"]) == 1, r
        assert float(r["maxrss_mb"]) > 0
    grad = float(got["ort_gradient"]["median_s"])
    for name in REQUIRED:
        assert float(got[name]["ratio_gradient"]) == pytest.approx(float(got[name]["median_s"]) / grad, rel=1e-6)
    # the authors' code is reported as not measured without DCONNX_AUTHORS_REF
    meta = json.load(open(quick_run / "results.json"))["meta"]
    assert meta["threads"] == 2 and meta["authors"].startswith(("not measured", "dc_decompose"))

    conv = list(csv.DictReader(open(quick_run / "conversion.csv")))
    assert {c["candidate"] for c in conv} >= {"ort_gradient", "splitgrad", "split_all3"}
    assert all(0.9 < float(c["size_ratio"]) < 1.2 and float(c["convert_s"]) > 0 for c in conv)

    md = (quick_run / "results.md").read_text()
    assert md.startswith("# Benchmark results (CPU:")
    for header in ("## Times", "## dconnx against the peers", "## Conversion", "## Map agreement"):
        assert header in md
    # every markdown table: a header, a separator row, and rows with as many cells as the header
    blocks, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    assert len(blocks) >= 4
    for block in blocks:
        n = block[0].count("|")
        assert set(block[1].replace("|", "").strip()) <= set("-: ") and block[1].count("|") == n, block[:2]
        assert len(block) >= 3 and all(line.endswith("|") and line.count("|") == n for line in block), block
    assert (quick_run / "results_cpu.png").stat().st_size < 500_000
    # the targets table holds the run's own ratios
    t = {r["candidate"]: float(r["median_s"]) for r in rows}
    line = next(ln for ln in md.splitlines() if ln.startswith("| Zennit LRP-ε / dconnx SplitLRP | fixture b2 cpu |"))
    measured = float(line.split("|")[3].strip().rstrip("×"))
    assert measured == pytest.approx(t["zennit_lrp_epsilon"] / t["splitlrp"], abs=0.0051)
    assert line.split("|")[5].strip() == ("yes" if measured >= 2 else "**no**")
    # the maps the run compared: the PyTorch split implementation agrees with dconnx
    agree = json.load(open(quick_run / "results.json"))["agreement"]["fixture b2 cpu"]
    assert agree["torch_split_splitgrad vs splitgrad"] < 1e-3
    assert agree["torch_split_splitlrp vs splitlrp"] < 1e-3


@pytest.fixture(scope="module")
def fixture_maps():
    x = make_input("fixture", 4)
    conv = dconnx.convert(str(FIXTURE), methods="splitgrad,splitcam,splitlrp", alpha=0.35).model
    sess = make_session(conv, ["CPUExecutionProvider"], threads=2)
    names = [o.name for o in sess.get_outputs()]
    return x, dict(zip(names, sess.run(None, {"input": x})))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_split_matches_dconnx_on_fixture(dtype, fixture_maps):
    """SplitGrad (α = 0.35), SplitCAM and SplitLRP of the straightforward PyTorch split equal
    dconnx's converted graph on the trained fixture (explained class: the argmax)."""
    x, want = fixture_maps
    ts = TorchSplit(torch_model("fixture"), dtype=dtype)
    got = ts(x, None, methods=("splitgrad", "splitcam", "splitlrp"), alpha=0.35)
    for name in ("splitgrad", "splitcam", "splitlrp"):
        a, b = got[name].double().numpy(), want[name].astype(np.float64)
        assert a.shape == b.shape == (4, 64, 64)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-3, (name, dtype, rel)


def test_torch_split_alpha_and_hidden_layer(fixture_maps):
    """Another α and a hidden layer (maps upsampled like dconnx's) agree as well."""
    x, _ = fixture_maps
    model = torch_model("fixture")
    ts = TorchSplit(model, layer="features_10")       # fx node name of features[10] (the third Relu)
    got = ts(x, None, methods=("splitgrad", "splitcam"), alpha=0.2)
    conv = dconnx.convert(str(FIXTURE), methods="splitgrad,splitcam", layer="/features/features.10/Relu_output_0").model
    sess = make_session(conv, ["CPUExecutionProvider"], threads=2)
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(None, {"input": x, "alpha": np.asarray(0.2, np.float32)})))
    for name in ("splitgrad", "splitcam"):
        a, b = got[name].double().numpy(), want[name].astype(np.float64)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-3, (name, rel)


def test_report_rewrites_the_same_tables_from_json(quick_run, tmp_path):
    """--report renders results.md again from results.json without measuring anything."""
    import shutil
    copy = tmp_path / "out"
    shutil.copytree(quick_run, copy)
    (copy / "results.md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--report", "--out", str(copy)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (copy / "results.md").read_text() == (quick_run / "results.md").read_text()
