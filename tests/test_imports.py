"""No import circles among our modules: each module's imports, the ones inside functions included (an import
deferred into a function is still a dependency), form a graph without cycles, so every module can be read, tested
and moved after the ones it builds on.

    python -m pytest tests/test_imports.py -q
"""

from __future__ import annotations

import ast
import graphlib

from conftest import ROOT

# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"loopgpt": "loopgpt", "model": "loopgpt.model", "server": "loopgpt.server", "train": "loopgpt.train",
            "export": "loopgpt.export", "loadtest": "loopgpt.loadtest"}


def modules() -> dict[str, object]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def dependencies(name: str, path, known) -> set[str]:
    """The modules of ours that `name` imports anywhere in its file (relative imports resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` depends on the module, else on pkg
                deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            deps |= {alias.name for alias in node.names}
    return {d for d in deps if d in known and d != name}


def test_no_import_circles():
    known = modules()
    assert len(known) > 40, "the source folders were not found"
    graph = {name: dependencies(name, path, known) for name, path in known.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None
