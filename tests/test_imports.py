"""The stage packages depend one way: no package imports another that imports it back (issue 24)."""

from __future__ import annotations

import ast
from pathlib import Path

import sraseg

PACKAGE = Path(sraseg.__file__).parent


def stage_imports() -> dict[str, set[str]]:
    """Each stage package (a folder of src/sraseg with an __init__.py) and the other stage packages its
    modules import, at the top or inside a function (a lazy import still ties the two together)."""
    stages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    graph: dict[str, set[str]] = {name: set() for name in stages}
    for name in stages:
        for module in (PACKAGE / name).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text(), str(module))):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from sraseg import blend` names the package in the alias
                    targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                else:
                    continue
                for target in targets:
                    parts = target.split(".")
                    if len(parts) > 1 and parts[0] == "sraseg" and parts[1] in graph and parts[1] != name:
                        graph[name].add(parts[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_sees_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_stage_packages_depend_one_way():
    graph = stage_imports()
    assert {"blend", "embed", "generate", "train"} <= set(graph)  # the walk found the stages
    assert "embed" in graph["generate"]  # the FD probe uses the encoder: generate -> embed, never back
    cycle = find_cycle(graph)
    assert cycle is None, f"stage packages import each other: {' -> '.join(cycle)}"
