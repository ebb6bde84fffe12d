"""BatchNormalization that could not be folded: a per-channel affine map s·x + t."""
from __future__ import annotations

import numpy as np

from ..ir import attrs
from .base import deflinear
from .checks import all_of, constant_parameters
from .elementwise import AffineMap


def bn_map(comp, node) -> AffineMap:
    v = comp.view
    gamma, beta, mean, var = (v.const(n) for n in node.input[1:5])
    eps = 1e-5
    for a in node.attribute:
        if a.name == "epsilon":
            eps = a.f
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    t = beta.astype(np.float64) - mean.astype(np.float64) * s
    rank = v.rank(node.input[0]) or 4
    shape = [-1] + [1] * (rank - 2)
    lin = AffineMap(comp, node, node.input[0], node.output[0], s.reshape(shape), t.reshape(shape))
    lin.kind = "weight"
    return lin


def _check_training(view, node, data_in, final):
    if int(attrs(node).get("training_mode", 0)):
        return "training-mode BatchNormalization"
    return None


deflinear("BatchNormalization", "normalization", bn_map, shift=True, recenter=True, weights=True,
          const_operands=True, check=all_of(constant_parameters, _check_training),
          doc="inference mode; folded into the preceding Conv/Gemm where legal, "
              "else split as a per-channel affine map (a shift and recentering point)")
