"""Independent float64 PyTorch reference of the DC decomposition (docs/method.md)."""
from . import dc_reference
from .dc_reference import (
    DCResult,
    CanonicalGraph,
    Op,
    UnsupportedModelError,
    canonicalize,
    channel_sum,
    run,
    splitcam,
    splitgrad,
    splitlrp,
    upsample,
)

__all__ = [
    "dc_reference",
    "DCResult",
    "CanonicalGraph",
    "Op",
    "UnsupportedModelError",
    "canonicalize",
    "channel_sum",
    "run",
    "splitcam",
    "splitgrad",
    "splitlrp",
    "upsample",
]
