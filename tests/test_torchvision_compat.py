"""dconnx.torchvision_compat: `import dconnx` lets quantus and zennit import torchvision, without
importing torch itself. Run in fresh interpreters, where tests/torchvision_ops.py has not run."""
import subprocess
import sys

import torch

from dconnx import torchvision_compat


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_import_dconnx_then_quantus_and_zennit():
    proc = _python("import sys, dconnx\n"
                   "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules\n"
                   "import quantus, zennit, torch, torchvision\n"
                   "from torchvision.models import vgg16\n"
                   "assert hasattr(torch.ops.torchvision, 'nms')\n"
                   "print('imported')")
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr


def test_hook_is_installed_once_and_finds_nothing():
    torchvision_compat.install()
    torchvision_compat.install()
    finders = [f for f in sys.meta_path if isinstance(f, torchvision_compat._TorchvisionOpsFinder)]
    assert len(finders) == 1
    assert finders[0].find_spec(torchvision_compat.TRIGGER) is None   # the regular finders import it
    assert finders[0].find_spec("numpy") is None


def test_defines_nothing_when_the_ops_exist():
    import torchvision  # noqa: F401  (through the hook: the operators exist now)
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    assert torchvision_compat.define_missing_ops() is False
