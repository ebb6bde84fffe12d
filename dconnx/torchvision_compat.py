"""Make torchvision importable beside a torch wheel its compiled ops do not fit.

torchvision 0.28 registers fake kernels for its C++ operators
(`torchvision::nms`, `torchvision::qnms`) as it imports, also when its compiled
extension failed to load, and then fails with "operator torchvision::nms does
not exist" (the CPU torch wheel beside the default torchvision wheel). Quantus
and Zennit import torchvision, so `import quantus` fails there.

`install()` (run by `import dconnx`) adds an import hook and nothing else: it
imports neither torch nor torchvision. When torchvision, during its own import,
reaches `torchvision._meta_registrations` (after trying to load its extension),
the hook defines the two schemas if the extension did not provide them; nothing
in dconnx calls them. With a working torchvision the hook changes nothing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

# the module of torchvision's that needs the operators; its __init__ loads the extension just before
TRIGGER = "torchvision._meta_registrations"
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None     # the torch.library.Library holding the schemas, kept alive


def define_missing_ops() -> bool:
    """Define the schemas unless torchvision's extension (or an earlier call) did; True if defined now.

    Imports torch: call it only where torch is being imported anyway.
    """
    global _library
    torch = importlib.import_module("torch")
    try:
        torch.ops.torchvision.nms  # noqa: B018  (provided by a loaded extension or an earlier call)
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")   # claims no ownership of the namespace
    for schema in SCHEMAS:
        lib.define(schema)
    _library = lib
    return True


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    """Finds nothing: runs define_missing_ops() when TRIGGER is about to be imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == TRIGGER:
            define_missing_ops()
        return None     # the regular finders import the module


def install() -> None:
    """Add the import hook once (idempotent). Too late if torchvision is already imported."""
    if not installed():
        sys.meta_path.insert(0, _TorchvisionOpsFinder())


def installed() -> bool:
    return any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path)
