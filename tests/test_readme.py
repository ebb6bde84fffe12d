"""The README's examples run as written: its `dconnx ...` commands and its Python blocks."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands():
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("dconnx "):
                cmds.append(line)
    return cmds


@pytest.fixture()
def workdir(tmp_path):
    for name in ("models", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_readme_has_examples():
    assert len(_commands()) >= 2 and _blocks("python")


def test_readme_commands_run(workdir):
    for cmd in _commands():
        args = [sys.executable, "-m", "dconnx"] + shlex.split(cmd)[1:]
        proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    assert (workdir / "fixture.dc.onnx").exists() and (workdir / "heat.png").exists()
    for m in ("splitgrad", "splitcam", "splitlrp"):
        assert (workdir / f"heat.{m}.npy").exists()


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_runs(workdir, index):
    """Each block in a fresh interpreter, as a user runs it: nothing this test process imported
    (tests/torchvision_ops.py, say) can make a block pass that fails for the user."""
    block = _blocks("python")[index]
    script = workdir / f"readme_block_{index}.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, script.name], cwd=workdir, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README python block {index}:\n{block}\n{proc.stdout}\n{proc.stderr}"
