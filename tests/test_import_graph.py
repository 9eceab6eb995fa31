"""The core's import graph: no circle, and a hub that imports only what it fans out with.

Read from the source with :mod:`ast`, imports inside functions included, so a cycle
cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "sysmanage"
#: What the hub may import: the registry and fan-out need channels, frames and envelopes.
HUB_IMPORTS = {"protocol", "streams", "summary", "topics", "transport"}
#: Modules that import nothing inside functions (each such import once hid a circle).
NO_LOCAL_IMPORTS = {"control", "events", "fleet", "hub", "node", "periodic"}


def core_modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in CORE.glob("*.py")}


def imported_core_modules(tree: ast.AST, core: set[str]) -> set[str]:
    """The ``sysmanage`` modules that ``tree`` imports, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "sysmanage":
            names = [f"sysmanage.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "sysmanage" and len(parts) > 1 and parts[1] in core:
                found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    core = set(modules)
    return {name: imported_core_modules(tree, core) - {name} for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph.get(name, ())):
            cycle = visit(target, [*path, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def test_the_core_imports_in_no_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(f"sysmanage/{m}.py" for m in cycle)


def test_the_hub_imports_only_channels_frames_and_envelopes():
    assert import_graph()["hub"] <= HUB_IMPORTS


def test_the_event_core_imports_nothing_inside_functions():
    modules = core_modules()
    local = [
        f"sysmanage/{name}.py:{node.lineno}"
        for name in sorted(NO_LOCAL_IMPORTS)
        for function in ast.walk(modules[name])
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert local == []


def test_listeners_do_not_reach_for_the_hub_or_the_node():
    tree = ast.parse((CORE.parent / "alerts" / "evaluation.py").read_text())
    assert imported_core_modules(tree, {"hub", "node"}) == set()


def test_the_guard_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
