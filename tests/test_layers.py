"""The layers point one way: the engine is a library that knows nothing of the app, and nothing outside
runners/ (the programs every rank runs) imports runners/. Read from the source's own imports, those
inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import llmbatch

PACKAGE = Path(llmbatch.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every llmbatch module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from llmbatch import x
    return {name for name in found if name == "llmbatch" or name.startswith("llmbatch.")}


def test_nothing_outside_runners_imports_runners():
    outside = [p for p in PACKAGE.rglob("*.py") if "runners" not in p.relative_to(PACKAGE).parts]
    arrows = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in outside
        for name in imported_modules(path)
        if name.startswith("llmbatch.runners")
    ]
    assert arrows == []


def test_the_engine_imports_nothing_of_llmbatch_outside_itself():
    engine = sorted((PACKAGE / "engine").glob("*.py"))
    assert engine, "no engine/ package"
    leaks = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in engine
        for name in imported_modules(path)
        if not name.startswith("llmbatch.engine")
    ]
    assert leaks == []
