"""The package's imports: every import of a project module resolves (those inside functions too,
where a dangling one hides until the function runs), the import graph has no cycle, and the rooms
keep their rules (``parallel/`` and ``rope`` import nothing of the model, the loss or the
evaluator; the library never imports a job). Read from the source with ``ast``; nothing of the
graph is executed but the imports themselves."""

from __future__ import annotations

import ast
import importlib
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "longrope_jax"


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package, the built-in configs
    (``configs/``, installed as ``longrope_jax.configs``) included."""
    out = {}
    for folder, name in ((PACKAGE, PACKAGE), ("configs", f"{PACKAGE}.configs")):
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))[:-3].split(os.sep)
                    rel = rel[:-1] if rel[-1] == "__init__" else rel
                    out[".".join([name, *rel])] = os.path.join(d, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str):
    """(line, imported module, imported name or None) of every project import in a module."""
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == PACKAGE:
                for a in node.names:
                    yield node.lineno, base, a.name


def _edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    graph = defaultdict(set)
    for name, path in MODULES.items():
        for _, module, attr in _imports(name, path):
            target = f"{module}.{attr}" if attr and f"{module}.{attr}" in MODULES else module
            if target != name:
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_project_import_resolves_inside_functions_too():
    bad = []
    for name, path in sorted(MODULES.items()):
        for line, module, attr in _imports(name, path):
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if module not in MODULES:
                bad.append(f"{where}: no module {module}")
            elif attr is not None and attr != "*" and f"{module}.{attr}" not in MODULES:
                if not hasattr(importlib.import_module(module), attr):
                    bad.append(f"{where}: {module} has no {attr}")
    assert not bad, "\n".join(bad)


def test_the_module_graph_has_no_cycle():
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()))


def _room(module: str) -> str:
    """``longrope_jax.parallel.mesh`` -> ``parallel``; ``longrope_jax.rope`` -> ``rope``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def test_the_room_graph_has_no_cycle():
    """Modules folded into their room (a top-level module or subpackage): no two rooms import
    each other, even through others (``parallel`` and ``evaluate`` once did, inside functions)."""
    rooms = defaultdict(set)
    for a, targets in _edges().items():
        rooms[_room(a)].update(_room(b) for b in targets if _room(b) != _room(a))
    assert _cycle(rooms) is None, " -> ".join(_cycle(rooms))


# room -> the rooms it may import (besides itself and the package root, for __version__)
RULES = {
    "parallel": set(),
    "rope": set(),
    "memory": set(),
    "attention": {"parallel", "memory"},
}
LIBRARY_NEVER_IMPORTS = {"jobs", "cli", "__main__"}


@pytest.mark.parametrize("room", sorted(RULES))
def test_infrastructure_rooms_import_only_what_they_may(room):
    allowed = RULES[room] | {room, PACKAGE}
    bad = sorted({f"{a} imports {b}" for a, targets in _edges().items() if _room(a) == room
                  for b in targets if _room(b) not in allowed})
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_a_job():
    bad = sorted(f"{a} imports {b}" for a, targets in _edges().items() if _room(a) not in LIBRARY_NEVER_IMPORTS
                 for b in targets if _room(b) in LIBRARY_NEVER_IMPORTS)
    assert not bad, "\n".join(bad)


def test_the_checks_see_what_they_check():
    """The graph reader on known facts: a cycle is found, an import inside a function is read."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    inside = [(m, a) for _, m, a in _imports(f"{PACKAGE}.jobs.train", MODULES[f"{PACKAGE}.jobs.train"])]
    assert (f"{PACKAGE}.loading", "model_from") in inside  # imported inside initial_model()


def test_the_repository_stands_alone():
    """Every document a tracked file points to is in the repository (or public): no citation of
    the project's unpublished notes, and every ``docs/*.md`` a file names exists."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside, missing = [], []
    for f in files:
        if not f.endswith((".py", ".md", ".sh", ".ipynb", ".txt", ".toml", ".cfg")) or f == "tests/test_imports.py":
            continue
        with open(os.path.join(ROOT, f), errors="replace") as fh:
            text = fh.read()
        outside += [f"{f}: {m}" for m in re.findall(r"REFERENCE\.md|DESIGN\.md|\.\./shared\b", text)]
        missing += [f"{f}: {m}" for m in set(re.findall(r"docs/[\w-]+\.md", text))
                    if not os.path.exists(os.path.join(ROOT, m))]
    assert not outside and not missing, "\n".join(outside + missing)
