"""Import arrows point one way: the cost model sits below pruning and evaluation, pruning never imports
evaluation, models/batching never imports models/base, and no module or sub-package of explainprune
imports one that imports it back (every import counted: lazy ones inside functions, TYPE_CHECKING ones)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import explainprune

ROOT = Path(explainprune.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every explainprune module ``path`` imports, anywhere in the file (``from a import b`` counts a.b when
    a.b is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "explainprune"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "explainprune":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return out


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}
GRAPH = {module_name(p): (imports_of(p) & MODULES) - {module_name(p)} for p in ROOT.rglob("*.py")}


def area(module: str) -> str:
    """The sub-package or top-level module: explainprune.pruning.fastv -> pruning; explainprune -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_parser_sees_imports():
    assert "explainprune.pruning.base" in GRAPH["explainprune.pruning.fastv"]
    assert "explainprune.cost" in GRAPH["explainprune.evaluation.runner"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_cost_model_sits_below_pruning_and_evaluation():
    assert not {m for m in GRAPH["explainprune.cost"]}  # imports no explainprune module
    for module, targets in GRAPH.items():
        if area(module) == "pruning":
            assert not {t for t in targets if area(t) == "evaluation"}, module


def test_batching_does_not_import_base():
    assert not GRAPH["explainprune.models.batching"] & {"explainprune.models.base", "explainprune.models"}


def test_no_import_cycles():
    assert cycle(GRAPH) is None
    areas: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        areas[area(module)] |= {area(t) for t in targets if area(t) != area(module) and area(t)}
    assert cycle(dict(areas)) is None


def test_old_flops_imports_still_work():
    from explainprune import cost
    from explainprune.evaluation import flops

    assert flops.account is cost.account and flops.LLMShape is cost.LLMShape
    assert flops.method_account is cost.method_account
