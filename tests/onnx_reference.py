"""float64 execution of ONNX models with onnx.reference, for the checks onnxruntime's CPU
provider cannot run (it has no float64 Conv, ConvTranspose or pooling)."""
import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    """np.take_along_axis (the stock implementation uses np.choose, limited to 64 choices)."""

    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else axis
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, idx, axis=axis),)


def run_reference(model, feeds: dict) -> dict:
    ev = ReferenceEvaluator(model, new_ops=[GatherElements])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ev.run(None, feeds)))
