"""The stage packages depend one way: no package imports another that imports it back (issue 24); and no
module (file) of src/sraseg imports another that imports it back, even through others (issue 35)."""

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


def module_name(path: Path) -> str:
    """sraseg.train.loop for src/sraseg/train/loop.py; a package's __init__.py is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """Each module of src/sraseg and the sraseg modules it imports: at the top, inside a function (a lazy
    import still runs) or under `if TYPE_CHECKING:` (the files still name each other). `from a.b import c`
    counts as importing a.b.c when that is a module, else a.b."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in graph else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in graph:  # `import sraseg.a.b` of a name in a: the module a
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
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


def test_modules_import_one_way():
    """No file-level cycle inside src/sraseg, e.g. train/data.py and train/loop.py naming each other (the
    settings one way, the batch helpers the other) as they did."""
    graph = module_imports()
    assert {"sraseg.train.loop", "sraseg.train.methods", "sraseg.train.methods.bcp"} <= set(graph)
    assert "sraseg.train.methods" in graph["sraseg.train.loop"] and "sraseg.train.data" in graph["sraseg.train.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, f"modules import each other: {' -> '.join(cycle)}"


def test_module_graph_sees_lazy_and_type_only_imports(tmp_path, monkeypatch):
    """A cycle made only by an import inside a function, or one under TYPE_CHECKING, is still found."""
    package = tmp_path / "sraseg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("def f():\n    from sraseg.sub.b import g\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = module_imports()
    assert graph["sraseg.sub.a"] == {"sraseg.sub.b"} and graph["sraseg.sub.b"] == {"sraseg.sub.a"}
    assert find_cycle(graph) == ["sraseg.sub.a", "sraseg.sub.b", "sraseg.sub.a"]
