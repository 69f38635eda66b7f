"""The stage folders import each other in one direction only (no folder import cycles).

Nodes are the folders of ``src/mha2sha`` (``split``, ``verify``, ...) and its top-level modules
(``graph``, ``job``, ``cli``, ...). Imports inside functions count too: a cycle that only works
because one side imports late is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "mha2sha"


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mha2sha" or len(parts) < 2:
        return None
    return parts[1]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        unit = _unit(module)
        if unit is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                other = _unit(target)
                if other is not None and other != unit and (SRC / other).exists() | (SRC / f"{other}.py").exists():
                    edges.setdefault(unit, set()).add(other)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest rotation, found by DFS from each node."""
    found: set[tuple[str, ...]] = set()

    def dfs(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > start:
                dfs(start, nxt, [*path, nxt])

    for start in sorted(edges):
        dfs(start, start, [start])
    return [list(c) for c in sorted(found)]


def test_no_folder_import_cycles() -> None:
    cycles = _cycles(_edges())
    assert not cycles, "folder import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_ground_floor_imports_nothing_of_the_project() -> None:
    """The op vocabulary and the errors are imported by every stage: they import no stage."""
    edges = _edges()
    assert not edges.get("graph") and not edges.get("errors")


def test_the_cycle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
