"""No import cycle anywhere in the package: a static check over every ``import`` in src/fasq (those inside
functions included, which hide cycles from a plain ``import``), and the modules that used to sit on cycles
each imported first in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# The modules of the two quantization pipelines' plan, the sweep runner, and the ones that sat on the
# cli <-> bench <-> stream.cli and io <-> model cycles (issue 24).
CHECKED = ("fasq.config", "fasq.families", "fasq.planning", "fasq.model", "fasq.fit.equalize", "fasq.fit.allocate",
           "fasq.stream.plan", "fasq.sweep.runner", "fasq.sweep.worker", "fasq.io", "fasq.cli", "fasq.bench",
           "fasq.stream.cli")


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """fasq module -> the fasq modules it imports anywhere in its source (an import of a package that
    contains the importer is left out: Python has initialized it already)."""
    files = {}
    for f in (src / "fasq").rglob("*.py"):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, (f, is_pkg) in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - (node.level - 1) - (0 if is_pkg else 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in files and not mod.startswith(n + ".") and n != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_static_check_sees_function_level_imports():
    g = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(g) == [{"a", "b"}]
    graph = import_graph()
    assert "fasq.model" in graph["fasq.io"]          # io.load imports model inside the function
    assert "fasq.planning" in graph["fasq.stream.plan"]


def test_no_import_cycle():
    graph = import_graph()
    assert set(CHECKED) <= set(graph)
    bad = cycles(graph)
    assert not bad, f"import cycles (function-level imports included): {bad}"


@pytest.mark.parametrize("module", CHECKED)
def test_imports_first_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
