"""The package's import graph has no cycle.

Nodes are the modules of dconnx/ (dconnx/**/*.py) and passes/ (installed as dconnx.passes).
Edges are every import statement in a module, at module level AND inside functions (a
function-level import that closes a circle is still a circle: it only moves the failure to
call time), except imports under `if TYPE_CHECKING:`. An import names the module it loads:
`from .x import y` is an edge to `x.y` when that is a module, else to `x`; importing
`a.b.c` also runs the packages a and a.b, but those parent edges are not counted (every
submodule would otherwise close a circle with its package's __init__).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def package_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted((ROOT / "dconnx").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "passes").glob("*.py")):
        name = "dconnx.passes" if path.stem == "__init__" else f"dconnx.passes.{path.stem}"
        mods[name] = path
    return mods


def _type_checking_lines(tree) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
            out.update(t for t in targets if t in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from p import m` loads the module p.m when there is one, else p itself
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif target in mods:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    g = import_graph()
    assert {"dconnx.api", "dconnx.cli", "dconnx.passes.split", "dconnx.ops.base"} <= set(g)
    assert "dconnx.ops" in g["dconnx.passes.split"]            # absolute import
    assert "dconnx.compilation" in g["dconnx.ops.base"]        # relative import, two levels
    assert "dconnx.passes.preflight" in g["dconnx.passes.canonicalize"]   # function-level import


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)
