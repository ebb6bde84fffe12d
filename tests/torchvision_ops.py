"""Make torchvision importable beside the CPU torch wheel, for tests, benchmarks and scripts.

The fix is the package's own (dconnx/torchvision_compat.py, installed by `import dconnx`):
an import hook that defines `torchvision::nms`/`qnms` when torchvision's compiled
extension did not. Import this module before anything that imports torchvision
(zennit and quantus do as they load) in code that may not import dconnx first.
"""
from dconnx import torchvision_compat

torchvision_compat.install()
