"""Make torchvision importable beside the CPU torch wheel.

torchvision 0.28's Python side registers fake kernels for C++ operators
(`torchvision::nms`, `torchvision::qnms`) that its missing compiled
extension would define. Defining the two schemas first lets it import;
nothing in dconnx or its tests calls them. Import this module before
anything that imports torchvision (zennit does as it loads).
"""
import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def register() -> None:
    if getattr(register, "_done", False):
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already provided by a compiled torchvision)
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            lib.define(schema)
        register._lib = lib  # keep the library alive
    register._done = True


register()
