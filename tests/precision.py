"""A float32 ONNX model rewritten to float64, to check exactness without float32 rounding."""
import onnx
from onnx import TensorProto

from dconnx.precision import cast_model


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    return cast_model(model, TensorProto.DOUBLE)
