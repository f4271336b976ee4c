"""Reference answers and scoring: what a correct answer is, shared by ``label`` (its correct-only filter),
``eval`` (accuracy) and the sample sources.

A reference is a string, a number, or a list of them (VQA-style alternatives: any one counts). The
matchers (exact, choice, number, f1, anls, any, auto) are in ``explainprune.matchers``; ``is_correct`` asks
whether the prediction matches any reference under one of them (docs/matchers.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from explainprune.errors import InputError
from explainprune.matchers import MATCHERS, RULES, judge  # noqa: F401 (MATCHERS, RULES: the registry)


def _one(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{where} must be a string, a number or a list of them; got {type(value).__name__} "
                         f"{value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"{where} must be a finite number; got {value!r}")
        value = int(value) if value.is_integer() else value
    if isinstance(value, str) and not value.strip():
        raise InputError(f"{where} is empty: no reference to score against", hint="give the expected answer "
                         "or remove the sample")
    return str(value)


def normalize_answers(value: Any, where: str = "answer") -> tuple[str, ...]:
    """The acceptable answers of ``value``: a string or number -> (it,), a list of them -> all of them.
    Numbers become strings (9 -> "9", 9.0 -> "9", 0.5 -> "0.5"). Raises InputError for anything else, an
    empty list or an empty (or blank) answer, which nothing could match; ``where`` names the field."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(f"{where} is an empty list: give at least one acceptable answer")
        return tuple(_one(v, f"{where}[{i}]") for i, v in enumerate(value))
    return (_one(value, where),)


def is_correct(prediction: str, answers: str | Sequence[str], matcher: str = "exact", question: str = "") -> bool:
    """Whether ``prediction`` matches any of ``answers`` (a reference or a list of acceptable ones) under
    ``matcher`` (``explainprune.matchers``; "choice" and "auto" read the options from ``question``)."""
    return judge(prediction, answers, rule=matcher, question=question).correct


def display(answers: str | Sequence[str]) -> str:
    """One string for tables and reports: the answer, or the alternatives joined by " | "."""
    return answers if isinstance(answers, str) else " | ".join(answers)
