"""docs/paper.md maps every equation and hyperparameter to code and to a test: every `file:function` and
`tests/...py::test` it names must exist, so the map cannot point at code or tests that were renamed away."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "paper.md").read_text()
CODE = re.compile(r"`((?:src|recipes|benchmarks)/[\w/]+\.py):(\w+)`")
TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}


def test_every_equation_has_a_row():
    for eq in range(1, 7):
        assert f"| Eq. {eq}" in DOC, f"Eq. {eq} has no row in docs/paper.md"


def check(refs: list[tuple[str, str]], sep: str) -> None:
    assert len(refs) >= 15
    for file, name in refs:
        assert (ROOT / file).is_file(), file
        assert name in names(ROOT / file), f"{file}{sep}{name} named in docs/paper.md does not exist"


def test_code_references_exist():
    check(CODE.findall(DOC), ":")


def test_test_references_exist():
    check(TEST.findall(DOC), "::")
    for file in FILE.findall(DOC):
        assert (ROOT / file).is_file(), file
