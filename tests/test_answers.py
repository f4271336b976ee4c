"""Reference answers: strings, numbers and lists of acceptable answers; anything else is refused."""

from __future__ import annotations

import pytest

from explainprune.answers import MATCHERS, display, is_correct, normalize_answers
from explainprune.errors import InputError


def test_normalize_answers_accepts_strings_numbers_and_lists():
    assert normalize_answers("9") == ("9",)
    assert normalize_answers(9) == ("9",) and normalize_answers(9.0) == ("9",) and normalize_answers(0.5) == ("0.5",)
    assert normalize_answers(["9", "nine", 9]) == ("9", "nine", "9")


@pytest.mark.parametrize("bad", [None, True, {"a": 1}, [], ["9", None], float("nan"), [["9"]]])
def test_normalize_answers_rejects_other_types(bad):
    with pytest.raises(InputError, match="answer"):
        normalize_answers(bad)


def test_is_correct_with_alternatives():
    assert is_correct(" Nine. ", ("9", "nine")) and is_correct("9", "9") and not is_correct("19", ["9", "nine"])
    assert "exact" in MATCHERS
    assert display(("9", "nine")) == "9 | nine" and display("9") == "9"
    with pytest.raises(ValueError, match="available: exact"):
        is_correct("9", "9", matcher="f1x")


def test_input_error_names_file_line_sample():
    err = InputError("question is empty", file="m.jsonl", line=3, sample="a7", hint="fix it")
    assert str(err) == "m.jsonl:3: sample a7: question is empty; fix it" and isinstance(err, ValueError)
