"""Registry completeness: every supported op has both rules and at least one op-table case."""
import pytest

from dconnx import ops
from op_cases import CASES


def test_every_supported_op_has_split_and_backward_rules():
    for op in ops.SUPPORTED:
        assert op in ops.SPLIT_RULES, f"{op} has no split rule"
        assert op in ops.BACKWARD_RULES, f"{op} has no backward rule"
    assert set(ops.SPLIT_RULES) == set(ops.SUPPORTED) == set(ops.BACKWARD_RULES)


def test_every_supported_op_has_an_op_table_case():
    covered = {op for case in CASES for op in case.ops}
    missing = set(ops.SUPPORTED) - covered
    assert not missing, f"no op-table case for {sorted(missing)}"


def test_supported_and_refused_tables_do_not_overlap():
    assert not set(ops.SUPPORTED) & set(ops.UNSUPPORTED)
    assert not set(ops.CANONICALIZED) & set(ops.UNSUPPORTED)


def test_registering_a_rule_twice_is_an_error():
    with pytest.raises(ops.RegistryError, match="already registered"):
        ops.split_rule("Conv")(lambda comp, node: None)
    with pytest.raises(ops.RegistryError, match="already registered"):
        ops.backward_rule("Relu")(lambda comp, node, rs, cts: [])
    with pytest.raises(ops.RegistryError):
        ops.describe("Conv", "linear", shift=True, recenter=True, doc="again")


def test_op_cases_produce_the_ops_they_claim():
    """Each case's exported and canonicalized graph contains the ops listed for it."""
    import numpy as np
    import torch
    from dconnx.compilation import Compilation, Options
    from dconnx.io import validate
    from dconnx.passes.canonicalize import Canonicalize
    from dconnx.passes.preflight import Preflight
    from helpers import export
    for case in CASES:
        x = torch.tensor(np.zeros(case.shape, np.float32))
        comp = Compilation(validate(export(case.module(), x, keep_bn=case.keep_bn)), Options())
        Preflight()(comp)
        Canonicalize()(comp)
        present = {n.op_type for n in comp.model.graph.node}
        assert set(case.ops) <= present, (case.name, case.ops, present)
