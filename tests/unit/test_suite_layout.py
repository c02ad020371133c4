"""The suite's own layout: tests/unit and tests/integration are not packages, so pytest imports
each test file by its basename (rootdir-relative "rootdir" import mode): two files with one name
in different folders stop the whole collection ("import file mismatch")."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(path.name for path in TESTS.rglob("test_*.py") if ".venv" not in path.parts)
    assert names, "no test files found under %s" % TESTS
    assert [name for name, n in names.items() if n > 1] == []
