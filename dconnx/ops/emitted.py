"""Facts about the ops the compiler emits, which the optimize pass's rewrites of the converted
graph ask (the OpSpecs describe the ops a model brings; these, the ops the rules write)."""
from __future__ import annotations

# keep finite values finite (short of overflow): their results need no guard against 0·inf
FINITE_PRESERVING = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Add", "Sub", "Sum", "Neg",
                               "Relu", "Where", "Concat", "ScatterElements", "GatherElements", "ReduceSum",
                               "AveragePool", "Pad", "Resize", "Tile"})
# only move values: what matters is where they come from
VALUE_MOVES = frozenset({"Split", "Slice", "Reshape", "Transpose", "Identity", "Expand", "Squeeze", "Unsqueeze",
                         "Flatten"})
# elementwise: of scalar operands, a scalar
SCALAR_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Cast"})
# the weight products, each with the number of inputs it has when biased (the bias is the last)
WEIGHT_PRODUCTS = {"Conv": 3, "ConvTranspose": 3, "MatMul": 2, "Gemm": 3}
# the two-operand sums the rules emit
SUMS = frozenset({"Sum", "Add"})
