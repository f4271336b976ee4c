"""Answer matchers: a table of (prediction, reference, rule) -> verdict, as the field's evaluators judge."""

import pytest

from explainprune.matchers import (
    anls,
    auto_rule,
    judge,
    normalize_text,
    parse_choice,
    parse_number,
    parse_options,
    token_f1,
)

MC_QUESTION = "What state is the water in?\nA. Ice\nB. Liquid\nC. Vapor\nD. Plasma\nAnswer with the option's letter."

CASES = [
    # prediction, reference(s), rule, expected
    ("C", "C", "choice", True),
    ("C.", "C", "choice", True),
    ("(C)", "C", "choice", True),
    ("C. Vapor.", "C", "choice", True),
    ("C. Vapor", "(C) Vapor", "choice", True),
    ("The answer is C", "C", "choice", True),
    ("The answer is (C).", "C", "choice", True),
    ("Vapor", "C", "choice", True),  # the option's text, options listed in the question
    ("B", "C", "choice", False),
    ("B. Liquid", "C", "choice", False),
    ("I think it is vapour", "C", "choice", False),
    ("", "C", "choice", False),
    ("seven", "7", "exact", True),
    ("The cat.", "cat", "exact", True),
    ("  Seven. ", ["7", "seven"], "exact", True),
    ("dog", ["cat", "kitten"], "exact", False),
    ("a red car", "red car", "exact", True),
    ("3.5", "3.5", "exact", True),
    ("35", "3.5", "exact", False),
    ("about 1,200 people", "1200", "number", True),
    ("7", 7, "number", True),
    ("seven", "7", "number", True),
    ("7.0000001", "7", "number", True),
    ("8", "7", "number", False),
    ("no idea", "7", "number", False),
    ("a man riding a red bicycle down the street", "a man is riding a red bicycle on the street", "f1", True),
    ("a cat sleeps", "a man is riding a red bicycle on the street", "f1", False),
    ("Hello Wrld", "hello world", "anls", True),
    ("xyz", "hello world", "anls", False),
    ("anything at all", "whatever", "any", True),
]


@pytest.mark.parametrize("prediction,reference,rule,expected", CASES)
def test_verdict_table(prediction, reference, rule, expected):
    v = judge(prediction, reference, rule=rule, question=MC_QUESTION if rule == "choice" else "")
    assert v.correct is expected, (prediction, reference, rule, v)
    assert v.rule == rule


def test_auto_picks_the_rule_per_sample():
    assert auto_rule(["C"], MC_QUESTION) == "choice"
    assert auto_rule(["(B) Liquid"], MC_QUESTION) == "choice"
    assert auto_rule(["12"]) == "number"
    assert auto_rule(["1,200", "1200"]) == "number"
    assert auto_rule(["red car"]) == "exact"
    assert auto_rule(["A man rides a bicycle down a busy street at night"]) == "f1"
    assert judge("C. Vapor.", "C", "auto", MC_QUESTION) == judge("C. Vapor.", "C", "choice", MC_QUESTION)
    assert judge("there are 12", "12", "auto").correct
    assert not judge("there are 13", "12", "auto").correct
    # a one-letter word answer that is not an option letter is not multiple choice
    assert auto_rule(["a"]) == "exact"


def test_helpers():
    assert normalize_text("  The Seven Dogs! ") == "7 dogs"
    assert normalize_text("3.50 m.") == "3.50 m"
    assert parse_options(MC_QUESTION) == {"A": "Ice", "B": "Liquid", "C": "Vapor", "D": "Plasma"}
    assert parse_options("Which? (A) red (B) green (C) blue") == {"A": "red", "B": "green", "C": "blue"}
    assert parse_choice("The answer is B.") == "B"
    assert parse_choice("Answer: (D)") == "D"
    assert parse_choice("Apples are red") is None
    assert parse_number("-3.5 degrees") == -3.5
    assert parse_number("nothing") is None
    assert token_f1("the cat sat", "cat sat") == 1.0
    assert token_f1("cat", "dog") == 0.0
    assert anls("abc", "abc") == 1.0
    assert anls("abcd", "abce") == pytest.approx(0.75)


def test_threshold_and_errors():
    assert judge("a man rides", "a man rides a bike", "f1", threshold=0.9).correct is False
    assert judge("a man rides", "a man rides a bike", "f1", threshold=0.5).correct is True
    with pytest.raises(ValueError, match="did you mean 'choice'"):
        judge("C", "C", rule="choise")
    assert judge("x", [], rule="any").correct
    assert not judge("x", [], rule="exact").correct


def test_number_tolerance_is_tight():
    """"101" is not "100": the tolerance absorbs float noise (1e-6 relative), not a unit off."""
    assert not judge("101", "100", "number").correct
    assert not judge("99", "100", "number").correct
    assert not judge("100.5", "100", "number").correct
    assert judge("100.00001", "100", "number").correct
    assert not judge("there are 101", "100", "auto").correct


def test_choice_needs_a_letter_on_its_own_after_the_answer_is():
    """"the answer is because ..." names no option (B is the first letter of a word, not a letter)."""
    assert parse_choice("The answer is because the water is cold") is None
    assert parse_choice("the answer is because the water is cold", {"B": "Liquid", "C": "Vapor"}) is None
    assert not judge("The answer is because it boils", "B", "choice", MC_QUESTION).correct
    assert not judge("My choice is definitely vapor", "D", "choice", MC_QUESTION).correct
    assert parse_choice("The answer is B because the water is cold") == "B"
    assert parse_choice("the option is (c), vapor") == "C"
