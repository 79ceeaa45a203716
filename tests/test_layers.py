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


def module_file(name: str) -> Path | None:
    """The file that importing `name` runs: a module's .py, or a package's __init__.py."""
    parts = name.split(".")[1:]
    candidates = [PACKAGE.joinpath(*parts[:-1], parts[-1] + ".py")] if parts else []
    for path in (*candidates, PACKAGE.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def test_no_import_circle():
    graph = {
        path: {target for name in imported_modules(path) if (target := module_file(name)) and target != path}
        for path in PACKAGE.rglob("*.py")
    }
    circles, state = [], {}  # state: 1 on the walk's path, 2 done

    def walk(path: Path, trail: list[Path]) -> None:
        state[path] = 1
        for target in sorted(graph[path]):
            if state.get(target) == 1:
                loop = trail[trail.index(target) :] + [target]
                circles.append(" -> ".join(str(p.relative_to(PACKAGE)) for p in loop))
            elif target not in state:
                walk(target, trail + [target])
        state[path] = 2

    for path in sorted(graph):
        if path not in state:
            walk(path, [path])
    assert circles == []
