"""A float32 ONNX model rewritten to float64, to check exactness without float32 rounding."""
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE


def _retype(value_infos):
    for vi in value_infos:
        if vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F64


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == F32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64),
                                                              t.name))
    _retype(g.input)
    _retype(g.output)
    del g.value_info[:]
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i == F32:
                a.i = F64
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m
