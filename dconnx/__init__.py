"""dconnx: compile ReLU CNNs in ONNX into ONNX graphs that also return
DC-decomposition attribution maps (SplitGrad, SplitCAM, SplitLRP)."""
from .api import ConvertedModel, compile_model, convert  # noqa: F401
from .compilation import Options  # noqa: F401
from .errors import (DconnxError, InputError, InvalidModelError, LayerError,  # noqa: F401
                     NumericalError, OptionError, OutputError, UnsupportedOpError)
from .quantus_adapter import quantus_explain_func  # noqa: F401  (imports neither quantus nor torch)
from .torchvision_compat import install as _install_torchvision_compat

_install_torchvision_compat()   # an import hook only (no torch): quantus/zennit import beside the CPU torch wheel

__version__ = "0.1.0"
