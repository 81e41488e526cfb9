"""The graph vocabulary (``topofx.ir``) is a leaf, and capture stands on it alone: capture, topology
and the rewrite driver no longer import each other in a circle (read from the source, with ast)."""
from __future__ import annotations

import ast
from pathlib import Path

import topofx

PACKAGE = Path(topofx.__file__).parent


def _topofx_imports(path: Path) -> set[str]:
    """The topofx modules ``path`` imports (anywhere in the file, lazy imports included)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            found |= {n for n in names if n.startswith("topofx")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("topofx")}
    return found


def test_ir_imports_nothing_of_topofx():
    assert _topofx_imports(PACKAGE / "ir.py") == set()


def test_capture_imports_only_the_vocabulary_from_outside_its_package():
    outside = set()
    for path in (PACKAGE / "capture").glob("*.py"):
        outside |= {m for m in _topofx_imports(path) if not m.startswith("topofx.capture")}
    assert outside == {"topofx.ir"}


def test_topology_does_not_import_the_rewrite_driver_or_capture():
    imported = _topofx_imports(PACKAGE / "topology.py")
    assert imported == {"topofx.ir"}
