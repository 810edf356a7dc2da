"""The package's modules import each other as a staircase: no cycle, counting imports inside functions
(which hide a cycle from Python but not from a reader).  Static: every ``import`` / ``from ... import``
in every module of src/fasq is read with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "fasq"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(importer: str, is_pkg: bool, node: ast.AST, known: set[str]) -> set[str]:
    """fasq modules an import statement loads (a package's ``__init__`` counts as the package)."""
    out = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_pkg else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [mod] + [f"{mod}.{a.name}" for a in node.names]
    for n in names:
        while n and n not in known:
            n = n.rpartition(".")[0]
        if n.startswith("fasq"):
            out.add(n)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= resolve(name, is_pkg, node, known)
        # a submodule importing its own parent packages is how Python loads it, not a dependency
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    g = import_graph()
    assert "fasq.model" in g["fasq.io"]          # io.load imports model inside the function
    assert "fasq.manifest" in g["fasq.io"]


def test_no_import_cycle():
    found = [c for c in cycles(import_graph()) if c != ["fasq"]]
    assert not found, "import cycles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)
