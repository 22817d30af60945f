"""The package's layering: no module imports another that imports it back, directly or through others.

Every import counts, at module level or inside a function (``import_module("msi.models")`` too), except those
under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import msi

PACKAGE = Path(msi.__file__).parent


def module_name(path: Path) -> str:
    parts = ("msi", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack += node.orelse
            continue
        out.append(node)
        stack += ast.iter_child_nodes(node)
    return out


def imports(path: Path) -> set[str]:
    """The msi modules ``path`` imports when it runs (a ``from msi.x import y`` of a submodule y counts y too)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            if isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
    return {m for m in found if m in MODULES}


def cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to itself, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports(path) - {name} for name, path in MODULES.items()}
    graph = {name: {m for m in deps if not name.startswith(m + ".") and m != "msi"} for name, deps in graph.items()}
    cycles = {name: c for name in graph if (c := cycle_through(name, graph))}
    assert cycles == {}, " | ".join(" -> ".join(c) for c in cycles.values())


def test_the_import_reader_sees_late_and_hidden_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from msi.config import Config\n"
                      "def f():\n    import msi.train\n    importlib.import_module('msi.models')\n"
                      "from msi.models import base\n")
    assert imports(source) == {"msi.train", "msi.models", "msi.models.base"}
