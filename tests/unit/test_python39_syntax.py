"""Every module of the project parses as Python 3.9, the language of Debian's PyPy (pypy3 7.3.11).

`make setup PYTHON=pypy3` runs the proxy on PyPy; CI runs CPython 3.11, where 3.10+ syntax
(match statements, parenthesised context managers, except*, PEP 604 unions in evaluated
annotations) would pass unnoticed.  This test compiles every file with the parser's 3.9 grammar
and also rejects `X | Y` annotations in modules that evaluate their annotations (no
`from __future__ import annotations`), which 3.9 turns into a TypeError at import time.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ("txrdsproxy", "tests", "bench", "soak", "scripts", "twisted")


def _sources():
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


SOURCES = list(_sources())


def _annotations(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _has_future_annotations(tree):
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names)
               for node in tree.body)


def _pep604_unions(tree):
    for annotation in _annotations(tree):
        for node in ast.walk(annotation):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                yield node.lineno


def test_the_walk_finds_the_project():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert "txrdsproxy/service.py" in names and "bench/run.py" in names
    assert len(SOURCES) > 100


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_parses_as_python_3_9(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, str(path), feature_version=(3, 9))
    if not _has_future_annotations(tree):
        lines = list(_pep604_unions(tree))
        assert not lines, ("%s: `X | Y` in an evaluated annotation at line(s) %s fails on "
                           "Python 3.9: use Optional/Union or `from __future__ import annotations`"
                           % (path.name, lines))


def test_the_guard_rejects_what_3_9_cannot_run():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))
    tree = ast.parse("def f(a: int | None) -> str | None:\n    pass\n", feature_version=(3, 9))
    assert not _has_future_annotations(tree) and list(_pep604_unions(tree)) == [1, 1]
    tree = ast.parse("from __future__ import annotations\n", feature_version=(3, 9))
    assert _has_future_annotations(tree)
