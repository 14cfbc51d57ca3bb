"""The package's import graph: every module imports, no module imports itself through others, and
the model never imports the weight converters (data flows one way, DESIGN.md).

The graph is read from the source with ``ast``, lazy imports inside functions included: a circle
that only closes at call time is still a circle to a reader following "go to definition".
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import m2f_lite

ROOT = Path(m2f_lite.__file__).parent


def module_names() -> dict[str, Path]:
    """``m2f_lite.x.y`` -> its file, for every ``.py`` in the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_names()


def imports_of(name: str) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (top level or in a function)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from m2f_lite import checkpoint` names a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle() -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for name in sorted(GRAPH):
        if name not in state and (cycle := visit(name)) is not None:
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    # lazy, inside a function body: the CLI imports the converter only when `convert` runs
    assert "m2f_lite.weights.convert" in GRAPH["m2f_lite.cli"]
    # `from m2f_lite import checkpoint as ckpt` is an edge to the module, not to the package
    assert "m2f_lite.checkpoint" in GRAPH["m2f_lite.cli"]
    assert "m2f_lite.modeling.mask2former" in GRAPH["m2f_lite.modeling"]


def test_find_cycle_finds_a_circle(monkeypatch):
    """The check itself can fail: a circle put into the graph is found and named."""
    monkeypatch.setitem(GRAPH, "m2f_lite.data.cli", GRAPH["m2f_lite.data.cli"] | {"m2f_lite.cli"})
    cycle = find_cycle()
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"m2f_lite.cli", "m2f_lite.data.cli"} <= set(cycle)


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_model_never_imports_the_converters():
    model = [m for m in MODULES if m.startswith("m2f_lite.modeling")]
    for name in model:
        weights = sorted(m for m in reachable(name) if m.startswith("m2f_lite.weights"))
        assert not weights, f"{name} imports {weights}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)
