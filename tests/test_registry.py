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
    from op_cases import GRAPH_CASE_OPS
    covered = {op for case in CASES for op in case.ops} | set(GRAPH_CASE_OPS)
    missing = set(ops.SUPPORTED) - covered
    assert not missing, f"no op-table case for {sorted(missing)}"


def test_supported_and_refused_tables_do_not_overlap():
    assert not set(ops.SUPPORTED) & set(ops.UNSUPPORTED)
    assert not set(ops.CANONICALIZED) & set(ops.UNSUPPORTED)


def test_every_op_spec_is_complete():
    assert ops.incomplete_specs() == {}
    for op, spec in ops.SPECS.items():
        assert spec.op_type == op
        assert spec.kind in ("supported", "canonicalized", "refused", "shape-only"), (op, spec.kind)


@pytest.mark.parametrize("spec, problem", [
    (ops.OpSpec("X", "f", "d", split=lambda c, n: None), "no backward rule"),
    (ops.OpSpec("X", "f", "d", backward=lambda c, n, r, t: []), "no split rule"),
    (ops.OpSpec("X", "f", "", split=lambda c, n: None, backward=lambda c, n, r, t: []), "no family/doc"),
    (ops.OpSpec("X", "f", "d", linear_map=object), "linear map but no rules"),
    (ops.OpSpec("X", "f", becomes="Y"), "names no rewrite"),
    (ops.OpSpec("X", "f", refused=""), "without a reason"),
    (ops.OpSpec("X", "f", refused="no", becomes="Y", rewrite="r"), "also has rules or a rewrite"),
    (ops.OpSpec("X", "f", zero_n=True, shape_op=True), "stream facts but has no rules"),
    (ops.OpSpec("X", "f", "d", split=lambda c, n: None, backward=lambda c, n, r, t: [], shift="yes"),
     "is not True, False"),
    (ops.OpSpec("X", "f"), "neither supported"),
])
def test_an_incomplete_spec_is_reported(spec, problem):
    assert any(problem in p for p in spec.problems()), spec.problems()


def test_derived_tables_follow_the_specs():
    specs = ops.SPECS
    assert ops.SPLIT_RULES == {op: s.split for op, s in specs.items() if s.split}
    assert ops.BACKWARD_RULES == {op: s.backward for op, s in specs.items() if s.backward}
    assert ops.LINEAR_MAPS == {op: s.linear_map for op, s in specs.items() if s.linear_map}
    assert ops.CANONICALIZED == {op: s.becomes for op, s in specs.items() if s.becomes}
    assert ops.UNSUPPORTED == {op: s.refused for op, s in specs.items() if s.refused}
    assert ops.KEEPS_SIGN == {op for op, s in specs.items() if s.keeps_sign}
    assert ops.ZERO_N_PRESERVING == {op for op, s in specs.items() if s.zero_n}
    assert ops.SHAPE_OPS == {op for op, s in specs.items() if s.shape_op}
    # the readers outside dconnx/ops use the same objects, not copies
    from dconnx.passes import split
    from dconnx.rulesets import lrp_rules
    assert split.ZERO_N_PRESERVING is ops.ZERO_N_PRESERVING
    assert lrp_rules.KEEPS_SIGN is ops.KEEPS_SIGN


def test_piecewise_builders_make_one_spec(monkeypatch):
    """describe + split_rule + backward_rule (the older form) build one OpSpec; an op declared
    so far only as a shape op keeps that fact when it gains rules; a refused op cannot."""
    from dconnx.ops import registry
    monkeypatch.setattr(registry, "SPECS", dict(registry.SPECS))
    try:
        ops.facts("ZzShapeOp", shape_op=True)
        ops.describe("ZzShapeOp", "test", shift=False, recenter=False, doc="a test op", zero_n=True)
        ops.split_rule("ZzShapeOp")(lambda comp, node: None)
        assert not registry.SPECS["ZzShapeOp"].supported
        ops.backward_rule("ZzShapeOp")(lambda comp, node, rs, cts: [])
        s = registry.SPECS["ZzShapeOp"]
        assert s.supported and s.shape_op and s.zero_n and s.problems() == []
        assert "ZzShapeOp" in ops.SUPPORTED and "ZzShapeOp" in ops.ZERO_N_PRESERVING
        assert "ZzShapeOp" not in ops.SPECS       # the registry's own table was the copy
        refused = next(op for op, spec in registry.SPECS.items() if spec.refused)
        with pytest.raises(ops.RegistryError, match="declared refused"):
            ops.split_rule(refused)(lambda comp, node: None)
        with pytest.raises(ops.RegistryError, match="unknown op fact"):
            ops.describe("ZzOther", "test", shift=False, recenter=False, doc="d", keeps_sgn=True)
    finally:
        monkeypatch.undo()
        registry._derive()
    assert "ZzShapeOp" not in ops.SUPPORTED


def _onnx_op_names() -> set[str]:
    import onnx
    return {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")}


def op_type_literals(source: str, op_names: set[str]) -> list[tuple[int, list[str]]]:
    """(line, op names) of every set/list/tuple literal, or dict literal's keys, whose elements
    are all string constants and include an ONNX op type: a table of op facts. Single
    comparisons (`op == "Relu"`) and tuples mixing other values (an error's (node, op, reason))
    are not tables."""
    import ast
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, (ast.Set, ast.List, ast.Tuple)):
            elts = n.elts
        elif isinstance(n, ast.Dict):
            elts = [k for k in n.keys if k is not None]
        else:
            continue
        if elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
            hits = [e.value for e in elts if e.value in op_names]
            if hits:
                found.append((n.lineno, hits))
    return found


def test_the_op_literal_scan_finds_tables():
    names = _onnx_op_names()
    src = 'A = {"Conv", "Relu"}\nB = ("MaxPool",)\nC = {"Gemm": 1}\nif op in ["Add", "Sub"]: pass\n' \
          'D = ("NOTSET", "")\nE = [(label, "Clip", "why")]\nF = op == "Relu"\nG = ("float32", "float16")\n'
    assert [line for line, _ in op_type_literals(src, names)] == [1, 2, 3, 4]


def test_no_op_facts_outside_dconnx_ops():
    """Op facts live in the OpSpecs (dconnx/ops/); nothing in dconnx/ or passes/ keeps its own
    set, list, tuple or dict of op types."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    names = _onnx_op_names()
    ops_dir = root / "dconnx" / "ops"
    files = [p for d in ("dconnx", "passes") for p in sorted((root / d).rglob("*.py"))
             if ops_dir not in p.parents]
    assert len(files) > 30
    found = [f"{p.relative_to(root)}:{line}: {hits}" for p in files
             for line, hits in op_type_literals(p.read_text(), names)]
    assert not found, "op-type tables outside dconnx/ops (declare them as OpSpec facts):\n" + "\n".join(found)


def test_dconnx_ops_prints_every_spec_once(capsys):
    from dconnx.cli import main
    assert main(["ops"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    listed = [r[0] for r in rows if r[0] in ops.SPECS]
    assert sorted(listed) == sorted(ops.SPECS)
    for r in rows:
        if r[0] in ops.SPECS:
            assert r[1] == ops.SPECS[r[0]].kind


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
        model = export(case.module(), x, keep_bn=case.keep_bn, exporter=case.extra.get("exporter", "torchscript"))
        comp = Compilation(validate(model), Options())
        Preflight()(comp)
        Canonicalize()(comp)
        present = {n.op_type for n in comp.model.graph.node}
        assert set(case.ops) <= present, (case.name, case.ops, present)
