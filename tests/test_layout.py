"""The repo's import direction (docs/CONTRIBUTING.md): nothing imports an entry point, every script
stays a thin CLI, and every engine module says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "eval", "hubconf"} | {p.stem for p in (REPO / "scripts").glob("*.py")}
# No exceptions: scripts/demo.py and scripts/compare.py drive engine/demo.py and engine/compare.py.
KNOWN = {}
# An entry point parses arguments and calls engine: a script past this many lines holds library code.
SCRIPT_MAX_LINES = 300
# A library module past this many lines holds more than one concern (issue #25): split it along a seam
# a reader finds from the layout. The exception is a timm model-family file, one file by timm's convention.
MODULE_MAX_LINES = 800
MODEL_FAMILY_FILES = {"models/nat.py"}


def python_files():
    skip = {".venv", ".ext", ".git", "runs", "output"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_imports_an_entry_point():
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_modules(p) & ENTRY_POINTS)
        for p in python_files()
        if imported_modules(p) & ENTRY_POINTS
    }
    assert "compare" in ENTRY_POINTS and len(python_files()) > 20  # the scan sees the scripts and the repo
    assert offenders == KNOWN, f"import an engine module instead: {offenders}"


def test_every_engine_module_has_a_docstring():
    modules = sorted((REPO / "engine").rglob("*.py"))  # subpackages too (engine/zoo, engine/benchmark)
    assert {"bench", "checkpoint", "trainer", "scaling"} <= {p.stem for p in modules}
    missing = [str(p.relative_to(REPO)) for p in modules if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_scripts_are_thin_clis():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "scripts").glob("*.py")}
    assert "benchmark.py" in sizes and "zoo.py" in sizes
    too_long = {name: n for name, n in sizes.items() if n > SCRIPT_MAX_LINES}
    assert too_long == {}, f"move the logic into an engine module (script: <= {SCRIPT_MAX_LINES} lines)"


def test_library_modules_stay_small():
    modules = [p for d in ("engine", "models", "data", "configs") for p in (REPO / d).rglob("*.py")]
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in modules}
    assert "models/layers/functional.py" in sizes and sizes["models/nat.py"] > MODULE_MAX_LINES  # sees all
    too_long = {n: k for n, k in sizes.items() if k > MODULE_MAX_LINES and n not in MODEL_FAMILY_FILES}
    assert too_long == {}, f"split these along a seam (library module: <= {MODULE_MAX_LINES} lines)"


def engine_imports(path: Path) -> set[str]:
    """The engine modules `path` imports, at the top or in a function (a lazy import is still a circle)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("engine."):
                names.add(node.module.split(".")[1])
            elif node.module == "engine":
                names |= {a.name for a in node.names}
    return names - {path.stem}


def test_engine_has_no_import_cycle():
    graph = {p.stem: engine_imports(p) for p in (REPO / "engine").glob("*.py")}
    assert "checkpoint" in graph["factory"]  # the scan sees the imports
    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == [], f"engine modules import each other in a circle: {[' -> '.join(c) for c in cycles]}"
