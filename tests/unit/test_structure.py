"""The shape of the code, checked: runner/ never imports a pipeline, has no import cycle (imports
inside functions count), reads pipeline modules only through runner/spec.py, and keeps its
functions short; docs/architecture.md lists what a pipeline may define as the spec reads it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runner import spec

ROOT = Path(__file__).resolve().parents[2]
RUNNER = sorted((ROOT / "runner").glob("*.py"))
PRODUCT = RUNNER + sorted((ROOT / "pipelines").rglob("*.py"))
MAX_FUNCTION_LINES = 60


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def runner_graph() -> dict[str, set[str]]:
    own = {f"runner.{p.stem}" for p in RUNNER if p.stem != "__init__"}
    return {f"runner.{p.stem}": imported(p) & own for p in RUNNER if p.stem != "__init__"}


def test_runner_never_imports_a_pipeline():
    for path in RUNNER:
        assert not [n for n in imported(path) if n.split(".")[0] == "pipelines"], path.name


def test_no_import_cycle_among_runner_modules():
    graph = runner_graph()
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in graph[name]:
            visit(target, [*trail, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_only_the_spec_reads_pipeline_module_attributes():
    for path in RUNNER:
        if path.name == "spec.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr",
                                                                                 "hasattr"):
                first = node.args[0]
                assert not (isinstance(first, ast.Name) and first.id == "module"), \
                    f"{path.name}:{node.lineno} reads a pipeline module; use runner.spec"


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, long


def test_architecture_doc_lists_what_the_spec_reads():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert spec.reference() in doc, "regenerate with `python -m runner.spec` into the doc"
