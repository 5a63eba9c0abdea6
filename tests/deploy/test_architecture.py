"""docs/architecture.md's claims: no import circle, no private name used across modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "etrnd"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """Each etrnd module and the (module, name) pairs it imports from etrnd, anywhere in it
    (function-level and TYPE_CHECKING imports count: a circle of types is a circle too)."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("etrnd", *path.relative_to(PACKAGE).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        pairs: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("etrnd"):
                pairs |= {(node.module or "", alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                pairs |= {(a.name, "") for a in node.names if a.name.startswith("etrnd")}
        found[name] = pairs
    return found


def test_no_import_circle() -> None:
    imports = _imports()
    graph = {module: {f"{m}.{n}" if f"{m}.{n}" in imports else m for m, n in pairs}
             for module, pairs in imports.items()}
    circles: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for nxt in graph.get(path[-1], ()):
            if nxt in path:
                circle = path[path.index(nxt):]
                start = circle.index(min(circle))
                circles.add(tuple(circle[start:] + circle[:start]))
            else:
                walk([*path, nxt])

    for module in graph:
        walk([module])
    assert sorted(circles) == []


def test_no_private_name_imported_across_modules() -> None:
    private = sorted(f"{module}: from {m} import {n}" for module, pairs in _imports().items()
                     for m, n in pairs if n.startswith("_") and not n.startswith("__"))
    assert private == []
