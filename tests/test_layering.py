"""The house's floors: imports only point down (base ← pipelines ← trainers ← command line), and no two
modules import each other, directly or round a longer loop. Every import counts, also one inside a
function or under `TYPE_CHECKING`: a late import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import slidestream
import slidestream.cluster
import slidestream.pipelines
import slidestream.trainers

ROOT = "slidestream"
FLOORS = {  # package → floor; every other slidestream module is the top floor (the command line)
    "slidestream.cluster": 0,
    "slidestream.pipelines": 1,
    "slidestream.trainers": 2,
}
TOP = 3


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, found from the packages' own folders."""
    found: dict[str, Path] = {}
    packages = {ROOT: Path(slidestream.__file__).parent}
    packages.update({name: Path(__import__(name, fromlist=["_"]).__file__).parent for name in FLOORS})
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _floor(module: str) -> int:
    for package, floor in FLOORS.items():
        if module == package or module.startswith(package + "."):
            return floor
    return TOP


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The slidestream modules that the file at `path` imports (a name imported from a package counts
    as its submodule when there is one)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                targets.add(submodule if submodule in modules else node.module)
    return {t for t in targets if t in modules and t != ROOT}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_every_floor():
    graph = _graph()
    assert {_floor(m) for m in graph} == {0, 1, 2, TOP}
    assert "slidestream.cli" in graph and "slidestream.trainers.models.abmil" in graph


def test_imports_only_point_down():
    upward = sorted(
        f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(module)
    )
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_nothing_imports_the_command_line():
    graph = _graph()
    importers = {m for m, targets in graph.items() if "slidestream.cli" in targets}
    assert not importers, f"nothing imports the command line: {sorted(importers)}"


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
