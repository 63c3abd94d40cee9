"""The package's layers (docs/architecture.md), checked on the real import graph.

import-linter reads every import statement of `src/dit4dit` (those inside functions too) and checks
the contracts declared in pyproject.toml; the cycle check below finds any two modules that import
each other, directly or through others."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter is part of the test extra (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dit4dit"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("dit4dit")


def test_the_graph_is_the_real_one(graph):
    """Guards the checks below against an empty or wrong graph (e.g. another installed copy)."""
    import dit4dit

    assert Path(dit4dit.__file__).resolve().parent == SRC
    assert graph.direct_import_exists(importer="dit4dit.policy", imported="dit4dit.models.dit4dit")
    assert len(graph.modules) > 50


def test_import_contracts_hold(capsys):
    import logging

    from importlinter.cli import lint_imports

    enabled = [lg for lg in logging.Logger.manager.loggerDict.values()
               if isinstance(lg, logging.Logger) and not lg.disabled]
    try:
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"))
    finally:  # lint_imports configures logging with dictConfig, which disables every logger already created
        for lg in enabled:
            lg.disabled = False
    out = capsys.readouterr().out
    assert code == 0, out


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    class Fake:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycles(Fake()) == [["a", "b", "c"]]


def test_no_source_comment_points_outside_the_repository():
    """Design facts the code relies on are in docs/ (docs/design.md), not in files a clone lacks."""
    pattern = re.compile(r"DESIGN(\.md| §)")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in [*SRC.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
            if p.name != Path(__file__).name
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
