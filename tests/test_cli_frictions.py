"""A newcomer's first commands: convert's default method, one error path for every bad file
(exit 2, `dconnx: error: ...`, nothing written), converted models refused as input, output
files that honour the umask, complete --help, the README's size rule and a short repr."""
import argparse
import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import dconnx
from dconnx.cli import build_parser, main
from dconnx.errors import InvalidModelError, OutputError
from dconnx.io import atomic_write, current_umask, save_model
from dconnx.runtime import Explainer
from dconnx.viz import save_npy, save_png

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
FRAMEWORKS = ROOT / "models" / "frameworks"
IMAGE = ROOT / "docs" / "images" / "example.png"
ALL_THREE = "splitgrad,splitcam,splitlrp"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "fixture.dc.onnx"
    dconnx.convert(FIXTURE, out, methods="splitgrad,splitcam", layer=10)
    return out


def _files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def _fails_cleanly(argv, cwd: Path, capsys) -> str:
    """main(argv) exits 2 with `dconnx: error:` and leaves cwd's tree as it was (no output,
    no temporary file)."""
    before = _files(cwd)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "dconnx: error:" in err and "Traceback" not in err, err
    assert _files(cwd) == before
    return err


# -- 1. convert's default method; a CAM at the input is warned about --------------------------

def test_convert_defaults_to_splitgrad(tmp_path, capsys):
    out = tmp_path / "default.dc.onnx"
    assert main(["convert", str(FIXTURE), "-o", str(out)]) == 0
    assert Explainer(out).methods == ["splitgrad"]
    assert dconnx.convert(FIXTURE).methods == ["splitgrad"]          # the API agrees
    assert dconnx.convert(FIXTURE, methods=()).methods == []         # g and h only, on request


def test_cam_at_the_input_is_warned_about(tmp_path, capsys):
    out = tmp_path / "cam.dc.onnx"
    assert main(["convert", str(FIXTURE), "-o", str(out), "--methods", "splitgrad,splitcam"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dconnx: warning:")]
    assert len(warned) == 1 and "splitcam" in warned[0] and "splitgrad" not in warned[0]
    assert main(["convert", str(FIXTURE), "-o", str(out), "--methods", "splitcam", "--layer", "10"]) == 0
    assert "dconnx: warning:" not in capsys.readouterr().err
    for method in ("gradcam", "layercam"):
        with pytest.warns(UserWarning, match=method):
            dconnx.convert(FIXTURE, methods=method)


# -- 2. every bad file: exit 2 through one error path, nothing written -------------------------

@pytest.fixture()
def bad_files(tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(FIXTURE.read_bytes()[:100])
    jpeg = tmp_path / "photo.jpg"
    Image.open(IMAGE).convert("RGB").save(jpeg, format="JPEG")
    png = tmp_path / "photo.png"
    png.write_bytes(IMAGE.read_bytes())
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    folder = tmp_path / "existing"
    folder.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(IMAGE.read_bytes())
    return {"truncated": truncated, "jpeg": jpeg, "png": png, "text": text, "folder": folder,
            "images": images}


def test_explain_with_swapped_arguments(converted, bad_files, tmp_path, capsys):
    err = _fails_cleanly(["explain", bad_files["png"], converted, "-o", tmp_path / "heat.png"], tmp_path, capsys)
    assert str(bad_files["png"]) in err


def test_truncated_model(bad_files, tmp_path, capsys):
    """Every command that reads a model: one message, naming the file."""
    model = bad_files["truncated"]
    for argv in (["convert", model, "-o", tmp_path / "out.onnx"],
                 ["explain", model, bad_files["png"], "-o", tmp_path / "heat.png"],
                 ["info", model],
                 ["layers", model],
                 ["explain-dataset", model, bad_files["images"], "-o", tmp_path / "maps"],
                 ["eval", model, "-o", tmp_path / "eval-out", "-q"],
                 ["export-triton", model, tmp_path / "repo"]):
        err = _fails_cleanly(argv, tmp_path, capsys)
        assert str(model) in err, argv


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_info_on_an_image(kind, bad_files, tmp_path, capsys):
    err = _fails_cleanly(["info", bad_files[kind]], tmp_path, capsys)
    assert "not an ONNX model" in err


@pytest.mark.parametrize("kind", ["text", "png", "folder"])
def test_explain_dataset_with_a_non_model(kind, bad_files, tmp_path, capsys):
    _fails_cleanly(["explain-dataset", bad_files[kind], bad_files["images"], "-o", tmp_path / "maps"],
                   tmp_path, capsys)


def test_output_onto_a_folder(converted, bad_files, tmp_path, capsys):
    folder = bad_files["folder"]
    for argv in (["convert", FIXTURE, "-o", folder],
                 ["explain", converted, bad_files["png"], "-o", folder],
                 ["explain-dataset", converted, bad_files["images"], "-o", bad_files["text"]]):
        err = _fails_cleanly(argv, tmp_path, capsys)
        assert str(argv[-1]) in err


def test_the_api_raises_dconnx_errors(converted, bad_files, tmp_path):
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        Explainer(bad_files["png"])
    with pytest.raises(InvalidModelError, match="truncated"):
        Explainer(bad_files["truncated"])
    with pytest.raises(InvalidModelError, match="folder"):
        dconnx.convert(bad_files["folder"])
    with pytest.raises(OutputError, match="folder"):
        dconnx.convert(FIXTURE, bad_files["folder"])
    with pytest.raises(OutputError, match="folder"):
        save_npy(np.zeros(3), bad_files["folder"])
    with pytest.raises(OutputError):           # the folder to make is a file
        save_model(onnx.load(str(converted)), bad_files["text"] / "out.onnx")
    assert not (bad_files["text"].parent / "out.onnx").exists()


# -- 3. a converted model is refused as input, naming the file ---------------------------------

def test_converting_a_converted_model(converted, tmp_path, capsys):
    err = _fails_cleanly(["convert", converted, "-o", tmp_path / "twice.onnx"], tmp_path, capsys)
    assert "already converted" in err and str(converted) in err and "unsupported" not in err
    stripped = onnx.load(str(converted))
    del stripped.metadata_props[:]                 # still recognised by its generated nodes
    with pytest.raises(InvalidModelError, match="already converted"):
        dconnx.convert(stripped)


# -- 4. output files honour the umask ----------------------------------------------------------

def test_output_files_honour_the_umask(tmp_path):
    """A converted model, a PNG, an .npy and any atomic_write: 0o666 minus the umask, as a
    plain open() would make them (not tempfile's 0o600)."""
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            assert current_umask() == mask
            out = tmp_path / f"{mask:o}"
            dconnx.convert(FIXTURE, out / "model.dc.onnx")
            written = [out / "model.dc.onnx",
                       save_png(np.zeros((4, 4, 3), np.uint8), out / "heat.png"),
                       save_npy(np.zeros(3), out / "map.npy"),
                       atomic_write(out / "note.txt", lambda tmp: Path(tmp).write_text("x"))]
        finally:
            os.umask(old)
        for path in written:
            assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path


# -- 5. --help: every option explained, descriptions complete, pointers that exist -------------

def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    return parser, action.choices, helps


def test_every_option_has_help():
    parser, subs, helps = _subparsers()
    assert parser.description and parser.description.endswith(".")
    missing = []
    for name, sub in subs.items():
        if not helps.get(name):
            missing.append(name)
        for a in sub._actions:
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_descriptions_are_complete_sentences():
    _, subs, _ = _subparsers()
    for name, sub in subs.items():
        if sub.description is not None:
            text = sub.description.strip()
            assert text[0].isupper() or text[0] == "`", (name, text)
            assert text.endswith(".") and text.count("(") == text.count(")"), (name, text)
    assert subs["eval"].description.endswith("dconnx-converted models.")


def test_help_points_at_files_that_exist():
    _, subs, _ = _subparsers()
    texts = [a.help or "" for sub in subs.values() for a in sub._actions]
    docs = {m for t in texts for m in re.findall(r"docs/[\w.-]+\.md", t)}
    assert docs and all((ROOT / d).is_file() for d in docs), docs
    precision = next(a.help for a in subs["convert"]._actions if "--precision" in a.option_strings)
    assert "docs/reliability.md" in precision       # where the float16 accuracy is measured


def test_docs_cite_no_missing_spec():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "SPEC §" not in path.read_text(), path


# -- 6. the README's size rule, on the bundled models ------------------------------------------

def _readme_size_rule() -> dict:
    """kB per original node that the README's "weights" row allows, by methods."""
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| weights |"))
    found = re.search(r"at most ([\d.]+) kB per node with SplitGrad alone, ([\d.]+) kB with all three", row)
    assert found, row
    return {"splitgrad": float(found.group(1)), ALL_THREE: float(found.group(2))}


@pytest.mark.parametrize("path", [FIXTURE, FRAMEWORKS / "keras_cnn.onnx", FRAMEWORKS / "flax_cnn.onnx"],
                         ids=lambda p: p.stem)
def test_converted_size_follows_the_readme_rule(path, tmp_path):
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    for methods, kb_per_node in _readme_size_rule().items():
        out = tmp_path / f"{methods.count(',')}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # splitcam at the input; flax's stale value_info
            dconnx.convert(path, out, methods=methods)
        grown = out.stat().st_size - path.stat().st_size
        assert grown <= kb_per_node * 1000 * nodes, (methods, grown, nodes)


# -- 7. convert's result has a short repr ------------------------------------------------------

def test_convert_returns_a_result_with_a_short_repr(tmp_path):
    out = tmp_path / "short.dc.onnx"
    result = dconnx.convert(FIXTURE, out, methods="splitgrad,splitcam", layer=10)
    text = repr(result)
    assert len(text) < 300 and "\n" not in text, text
    assert str(out) in text and "splitgrad,splitcam" in text
    assert isinstance(result.model, onnx.ModelProto) and result.path == out
    assert result.SerializeToString() == out.read_bytes()
    assert [h.method for h in result.report.heads] == ["splitgrad", "splitcam"]
    unsaved = dconnx.convert(FIXTURE, methods="splitgrad")
    assert len(repr(unsaved)) < 300 and "not saved" in repr(unsaved)
    x = np.zeros((1, 3, 64, 64), np.float32)
    assert Explainer(result).maps(x)["splitcam"].shape == (1, 64, 64)    # accepted as the model


def test_output_piped_into_head_is_not_an_error():
    """`dconnx layers MODEL | head -2`: the closed pipe ends the listing quietly, exit 0."""
    import subprocess
    import sys
    model = Path(__file__).resolve().parent.parent / "models" / "fixture_cnn.onnx"
    proc = subprocess.run(f"'{sys.executable}' -m dconnx layers '{model}' | head -2; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "error" not in proc.stderr, proc.stderr
