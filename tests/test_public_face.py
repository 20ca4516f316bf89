"""The public face: every name in embedstore.__all__ resolves, and importing the package
costs nothing heavy; no import circle inside embedstore."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_importing_embedstore_loads_neither_tensorflow_nor_scikit_learn():
    code = "import sys, embedstore; print('tensorflow' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.tf
def test_every_public_name_resolves():
    import embedstore

    for name in embedstore.__all__:
        assert getattr(embedstore, name) is not None, name
    with pytest.raises(AttributeError):
        embedstore.not_a_name  # noqa: B018


def test_no_submodule_is_named_like_a_public_name():
    """Importing embedstore.X sets the package's attribute X to the module: a module named
    like a public function would replace it for everyone who imported the module first."""
    import embedstore

    submodules = {p.stem for p in (REPO / "embedstore").glob("*.py")} | {
        p.parent.name for p in (REPO / "embedstore").glob("*/__init__.py")}
    assert submodules & set(embedstore.__all__) == set()


def test_public_functions_stay_functions_whatever_was_imported_first():
    code = ("import embedstore.similarity, embedstore.auditing, embedstore.training, "
            "embedstore.prediction\n"
            "from embedstore import similar, audit, train, predict, sweep\n"
            "print(all(callable(f) and type(f).__name__ == 'function' "
            "for f in (similar, audit, train, predict, sweep)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split()[-1] == "True"


def _imports(module: Path) -> set[str]:
    """The embedstore modules a file imports, anywhere in it: lazy imports inside
    functions and imports for type checking are dependencies too."""
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n.startswith("embedstore")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("embedstore")}
    return found


def _unit(module: str) -> str:
    """The floor a module belongs to: embedstore.store.writer -> embedstore.store."""
    return ".".join(module.split(".")[:2])


def test_no_import_circle_inside_embedstore():
    """Between the floors of the package (store, backbones, engines, extract, heads, ...),
    dependencies go one way: e.g. the engines never reach back into extract."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "embedstore").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        unit = _unit(".".join(parts))
        if unit == "embedstore.__init__":
            continue  # the face imports everything lazily, by name
        graph.setdefault(unit, set()).update(
            _unit(m) for m in _imports(path) if _unit(m) not in (unit, "embedstore"))
    graph = {u: {m for m in deps if m in graph} for u, deps in graph.items()}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            pytest.fail("import circle: " + " -> ".join(cycle))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)


def test_every_package_is_listed_for_the_wheel():
    """pyproject names packages one by one (the CLI's folder is renamed on install): a new
    subpackage missing from the list is missing from the wheel, though an editable
    install still finds it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "embedstore").rglob("__init__.py")}
    assert found - listed == set()
