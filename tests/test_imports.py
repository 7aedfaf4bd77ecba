"""The package's import graph has no cycles, counting imports inside functions too (a lazy import hides a cycle from
Python, not from a reader), and dependencies point down the pipeline: scaling never imports torch training code,
kernels know nothing of the package above them."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (("sparse_dc", "sparse_dc"), ("kernels", "sparse_dc.kernels"))


def modules() -> dict[str, str]:
    """Dotted module name -> file, for the installed layout (kernels/ is sparse_dc.kernels)."""
    found = {}
    for folder, package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, folder))[:-3]
                    dotted = ".".join([package, *rel.split(os.sep)]).removesuffix(".__init__")
                    found[dotted] = os.path.join(dirpath, name)
    return found


def imports_of(name: str, path: str, known: dict[str, str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (a `from pkg import sub` counts as sub)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            out |= subs or {base}
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("lower,upper", [("sparse_dc.kernels", "sparse_dc."), ("sparse_dc.scaling", "sparse_dc.train"),
                                         ("sparse_dc.scaling", "sparse_dc.model"),
                                         ("sparse_dc.data", "sparse_dc.train"), ("sparse_dc.data", "sparse_dc.model")])
def test_dependencies_point_down_the_pipeline(lower, upper):
    graph = import_graph()
    shared = {"sparse_dc.errors"}  # the error base class every layer raises
    bad = {m: sorted(d for d in deps if d.startswith(upper) and not d.startswith(lower) and d not in shared)
           for m, deps in graph.items() if m.startswith(lower)}
    assert {m: d for m, d in bad.items() if d} == {}
