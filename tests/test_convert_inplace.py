"""`convert` refuses to write its output over its input model (same path, a symlink, a hard link):
the API and the CLI raise/exit 2 before converting, and nothing in the folder changes."""
import os
import shutil
from pathlib import Path

import pytest

import dconnx
from dconnx.cli import main
from dconnx.errors import OutputError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


@pytest.fixture()
def model(tmp_path) -> Path:
    dst = tmp_path / "m.onnx"
    shutil.copyfile(FIXTURE, dst)
    return dst


def _same_file_outputs(model: Path) -> list:
    """Every spelling of the input's own file: itself, relative, through a symlink, a hard link."""
    link = model.parent / "link.onnx"
    link.symlink_to(model.name)
    hard = model.parent / "hard.onnx"
    os.link(model, hard)
    sub = model.parent / "sub"
    sub.mkdir()
    return [(model, model), (model, str(model)), (model, sub / ".." / model.name), (model, link),
            (link, model), (model, hard)]


def test_api_refuses_output_that_is_the_input(model):
    pairs = _same_file_outputs(model)
    before = _snapshot(model.parent)
    for src, out in pairs:
        with pytest.raises(OutputError, match="is the input model"):
            dconnx.convert(src, out, methods="splitgrad")
    assert _snapshot(model.parent) == before     # nothing written, not even a temporary file


def test_cli_refuses_output_that_is_the_input(model, capsys, monkeypatch):
    pairs = _same_file_outputs(model)
    before = _snapshot(model.parent)
    monkeypatch.chdir(model.parent)
    for src, out in pairs + [("m.onnx", "./m.onnx")]:
        assert main(["convert", str(src), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dconnx: error: ") and "is the input model" in err, err
    assert _snapshot(model.parent) == before


def test_cli_still_converts_to_another_path(model, capsys):
    out = model.parent / "m.dc.onnx"
    assert main(["convert", str(model), "-o", str(out), "--methods", "splitgrad"]) == 0
    assert out.is_file() and model.read_bytes() == FIXTURE.read_bytes()
    assert dconnx.convert(model, model.parent / "again.dc.onnx", methods="").path.is_file()
