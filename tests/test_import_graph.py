"""The package's import graph has no cycles (module-level and function-level imports both
count: a deferred import still ties the two modules' floors together)."""

from __future__ import annotations

import ast
from pathlib import Path

import prograd_fast

PACKAGE = Path(prograd_fast.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.stmt, modules: dict) -> list[str]:
    """The package's modules one import statement loads (a name imported from a package
    counts as its submodule when there is one, else as the package's ``__init__``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = here[:len(here) - node.level + 1] if node.level else []
    name = ".".join(base + ([node.module] if node.module else []))
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in modules]
    return subs + ([name] if len(subs) < len(node.names) else [])


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (at any depth of its source)."""
    modules = _modules(root)
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _imported(module, path, node, modules)
                            if d in modules and d != module)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("from .a import x\n")
    assert cycles(import_graph(pkg)) == [frozenset({"pkg.a", "pkg.sub.b", "pkg.c"})]


def test_the_library_never_imports_the_command_line():
    graph = import_graph()
    cli = {"prograd_fast.cli", "prograd_fast.cli_eval"}
    users = sorted(m for m, deps in graph.items() if deps & cli and m not in cli)
    assert not users, f"library modules importing the CLI: {users}"


def test_the_data_sets_stand_below_the_clip_pipeline():
    graph = import_graph()
    above = ("prograd_fast.clip", "prograd_fast.protocols", "prograd_fast.cli")
    wrong = sorted((m, d) for m, deps in graph.items() if m.startswith("prograd_fast.datasets")
                   and not m.endswith(".cli") for d in deps if d.startswith(above))
    assert not wrong, f"data-set modules importing the layers above them: {wrong}"
