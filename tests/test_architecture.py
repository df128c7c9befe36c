"""The layout the README's Architecture section describes, checked on the source: data flows
downwards (no import cycle among amedlab's modules, counting imports inside functions too), every
stage is a short ``run(cfg)`` in ``amedlab/stages/``, and no library module has a ``run``."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "amedlab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the amedlab modules it imports anywhere in its body (late imports included)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_amedlab_modules():
    graph = import_graph()
    assert len(graph) > 50 and "amedlab.solvers.base" in graph["amedlab.amed.solvers"]  # the finder sees imports
    assert cycles(graph) == []


def test_the_solvers_never_import_amed():
    graph = import_graph()
    solvers = [m for m in graph if m.startswith("amedlab.solvers")]
    assert solvers and not any(t.startswith("amedlab.amed") for m in solvers for t in graph[m])


def _functions(path: Path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]


def test_every_stage_is_a_short_run_and_libraries_have_none():
    from amedlab.stages import STAGE_NAMES

    for name in STAGE_NAMES:
        funcs = {f.name: f for f in _functions(PACKAGE / "stages" / f"{name}.py")}
        assert "run" in funcs, name
        for f in funcs.values():
            assert f.end_lineno - f.lineno + 1 <= 60, f"stages/{name}.py: {f.name} has {f.end_lineno - f.lineno + 1} lines"
    libraries = [p for p in PACKAGE.rglob("*.py") if "stages" not in p.parts]
    assert [str(p) for p in libraries if any(f.name == "run" and f.col_offset == 0 for f in _functions(p))] == []
