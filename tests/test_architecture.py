"""The layout docs/architecture.md describes, checked on the source: data flows
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


def package_of(module: str) -> str:
    """``amedlab.evaluation.table`` -> ``amedlab.evaluation``; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        p = package_of(module)
        graph.setdefault(p, set())
        graph[p] |= {package_of(t) for t in targets if package_of(t) != p}
    return graph


def test_no_import_cycle_between_packages():
    """Folders too: a cycle between two packages (evaluation -> learned -> evaluation) is a tangle even
    when no two modules import each other."""
    graph = package_graph()
    assert "amedlab.specs" in graph and "amedlab.evaluation" in graph["amedlab.stages"]
    assert cycles(graph) == []


#: below the stages, only these import omegaconf or hydra: the package's own YAML (resources), the
#: conversion of config nodes to plain values (io.plain), and the user errors, which are Hydra's compact
#: exceptions so that Hydra prints them as one line (errors)
CONFIG_READERS = {"amedlab/io.py", "amedlab/resources.py", "amedlab/errors.py"}


def _below_stages(path: Path) -> bool:
    rel = path.relative_to(SRC).as_posix()
    return not (rel.startswith(("amedlab/stages/", "amedlab/specs/")) or rel in {"amedlab/cli.py", "amedlab/__main__.py"})


def test_no_library_module_imports_the_config_system_or_takes_a_cfg():
    """Only ``specs/`` and ``stages/`` read the composed config: no module below them imports
    omegaconf or hydra (but the two that read the package's own YAML) or has a ``cfg`` parameter."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _below_stages(path):
            continue
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if rel not in CONFIG_READERS and any(n.split(".")[0] in ("omegaconf", "hydra") for n in names):
                offenders.append(f"{rel}:{node.lineno} imports {names}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                offenders += [f"{rel}:{node.lineno} {node.name}({a.arg})" for a in args if a.arg == "cfg"]
    assert offenders == []


def test_no_library_function_receives_a_config_node_at_run_time(tmp_path, monkeypatch):
    """Every call into the library while real stages run (evaluate, distill, compare, table): no argument
    is a DictConfig or ListConfig. The stages hand over specs and plain values."""
    import sys

    from omegaconf import DictConfig, ListConfig

    from test_reliability import BASE, _compose, _tiny
    from amedlab.models.digits import save_denoiser
    from amedlab.stages import compare, distill, evaluate, table

    monkeypatch.chdir(tmp_path)
    model = save_denoiser(_tiny(0), tmp_path / "model.safetensors")
    base = [o.format(run=tmp_path, tiny=model) for o in BASE["evaluate"]]
    runs = [(evaluate.run, base + ["nfe=3", "eval.bootstrap.resamples=20"]),
            (evaluate.run, base + ["solver=amed", "nfe=3", "eval.bootstrap=false", "distill.num_trajectories=8"]),
            (distill.run, [o.format(run=tmp_path, tiny=model) for o in BASE["distill"]] + ["nfe=3"]),
            (compare.run, BASE["compare"]),
            (table.run, ["stage=table", f"sweep_dir={tmp_path}"])]
    seen, library = [], str(PACKAGE)

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(library):
            return
        path = Path(frame.f_code.co_filename)
        if not _below_stages(path) or path.relative_to(SRC).as_posix() == "amedlab/io.py":
            return
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if isinstance(frame.f_locals.get(name), (DictConfig, ListConfig)):
                seen.append(f"{path.relative_to(SRC)}:{code.co_name}({name})")

    for run, overrides in runs:
        cfg = _compose(overrides)
        sys.setprofile(profile)
        try:
            run(cfg)
        finally:
            sys.setprofile(None)
    assert (tmp_path / "metrics.json").is_file()
    assert sorted(set(seen)) == [], "\n".join(sorted(set(seen)))
