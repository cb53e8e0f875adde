"""Code a reader can hold in mind: no function or method in src/sraseg is over 100 lines (issue 35)."""

from __future__ import annotations

import ast
from pathlib import Path

import sraseg

PACKAGE = Path(sraseg.__file__).parent
MAX_LINES = 100


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """`file:line name (n lines)` of every function or method (nested ones included) longer than
    `limit` lines, counted from its `def` (decorators left out) to its last line."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_long_functions_are_found(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(tmp_path, limit=5) == [f"{tmp_path.name}/m.py:6 long (6 lines)"]


def test_no_function_is_over_100_lines():
    assert long_functions() == []
