"""The dependency direction, checked from the source: every import in ``streambus/`` and
``consumers/`` (at module level, inside functions and under ``TYPE_CHECKING`` alike).

    cli  ->  consumers, streambus.dashboard  ->  streambus.cfn  ->  the bus core (streambus/*)
    ->  store  ->  keys / schema / errors

No cycle anywhere; nothing imports upwards; the store's plumbing (``Bus._store``) stays in the
core; no module grows past 500 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).parent.parent
PACKAGES: Final = ("streambus", "consumers")
MAX_LINES: Final = 500


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES: Final = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that an import of ``name`` loads (``a.b.c`` -> ``a.b`` if ``c`` is
    a name in module ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> Iterator[str]:
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if (target := _resolve(name)) is not None and target != module:
                yield target


GRAPH: Final = {module: set(_imports(module)) for module in MODULES}


def _layer(module: str) -> str:
    if module in ("streambus.cli", "streambus.__main__") or module.startswith("streambus.cli."):
        return "cli"
    if module == "consumers" or module.startswith("consumers."):
        return "consumers"
    if module.startswith("streambus.dashboard"):
        return "dashboard"
    if module.startswith("streambus.cfn"):
        return "cfn"
    if module.startswith("streambus.store"):
        return "store"
    if module in ("streambus.keys", "streambus.schema", "streambus.errors"):
        return "base"
    return "core"


ALLOWED: Final = {
    "cli": {"cli", "consumers", "dashboard", "cfn", "core", "store", "base"},
    # The dashboard is an application on the bus: it reads the CFN Loop, never the store.
    "dashboard": {"dashboard", "cfn", "core", "base"},
    "consumers": {"consumers", "core", "store", "base"},
    "cfn": {"cfn", "core", "store", "base"},
    "core": {"core", "store", "base"},
    "store": {"store", "base"},
    "base": {"base"},
}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(GRAPH[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_the_graph_covers_the_tree() -> None:
    """The check reads the real tree (an empty graph would pass every test below)."""
    assert {"streambus.bus", "streambus.dispatch", "streambus.store", "streambus.cli",
            "consumers.metrics", "streambus.cfn.loop"} <= MODULES.keys()
    assert "streambus.dispatch" in GRAPH["streambus.coordinator"]
    assert sum(len(targets) for targets in GRAPH.values()) > 100


def test_no_import_cycle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    layer = _layer(module)
    upward = sorted(t for t in GRAPH[module] if _layer(t) not in ALLOWED[layer])
    assert upward == [], f"{module} ({layer}) imports {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                           if _layer(m) in ("consumers", "cfn", "dashboard")))
def test_apps_and_consumers_use_the_public_api_not_the_store(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    private = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr in ("_store", "_runtime")]
    assert private == [], f"{module} reaches into the bus's plumbing at lines {private}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_a_cycle_would_be_found() -> None:
    """The detector itself: a two-module loop added to a copy of the graph is reported."""
    saved = {m: set(t) for m, t in GRAPH.items()}
    try:
        GRAPH["streambus.keys"].add("streambus.bus")
        assert any("streambus.keys" in c and "streambus.bus" in c for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
