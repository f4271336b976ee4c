"""Answer matchers: is a model's free-form answer correct, judged the way the field's evaluators judge it.

Used by ``explainprune label`` (Appendix B keeps only correctly answered samples) and ``explainprune eval``.
Each matcher is a pure function ``(prediction, references, question) -> float score`` plus a threshold;
``judge`` applies one by name and returns a ``Verdict``. ``references`` are the acceptable answers
(a list of alternatives, as VQA-style data ships them).

  exact    normalised exact match with any alternative (lower case, punctuation, articles and the
           number words zero..twenty normalised, as VQAv2's evaluator does)
  choice   multiple choice: the option letter parsed from "C", "C.", "(C)", "C. Vapor", "The answer is C",
           or the option's text itself when the question lists the options (MMBench / Video-MME style)
  number   numeric equality with a tolerance (the first number in the answer; "seven" counts)
  f1       token F1 (SQuAD) >= threshold (default 0.5)
  anls     ANLS (DocVQA: 1 - normalised Levenshtein distance) >= threshold (default 0.5)
  any      keep all (for data with no checkable answer)
  auto     per sample: ``choice`` when the reference is an option letter, ``number`` when every reference
           is a number, ``exact`` for short references (<= 3 words), otherwise ``f1``
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_WORD_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[" + re.escape(string.punctuation.replace(".", "")) + r"]|(?<!\d)\.|\.(?!\d)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def normalize_text(text: str) -> str:
    """VQA-style normalisation: "  The Seven dogs. " -> "7 dogs"; "3.50" keeps its decimal point."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_WORD_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _as_refs(references: str | int | float | Sequence[str | int | float]) -> list[str]:
    if isinstance(references, (str, int, float)):
        return [str(references)]
    return [str(r) for r in references]


# -- multiple choice -------------------------------------------------------------------------------------
_OPTION_LINE = re.compile(r"(?:^|\n|\s)\(?([A-Z])[.)::]\s*([^\n]+?)(?=\s+\(?[A-Z][.):]\s|\n|$)")
_CHOICE_PATTERNS = (
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.:)]|$|\s)"),                      # "C", "C.", "(C)", "C. Vapor"
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?(?![a-z])", re.IGNORECASE),
    re.compile(r"^\s*([A-Z])\s*$"),
)


def parse_options(question: str) -> dict[str, str]:
    """Options listed in a question ("A. Gas\\nB. Liquid" or "(A) Gas (B) Liquid") -> {"A": "Gas", ...}."""
    return {m.group(1): m.group(2).strip() for m in _OPTION_LINE.finditer(question or "")}


def parse_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer names, or None: "C. Vapor." -> "C"; "The answer is (B)" -> "B"; with
    ``options`` an answer that is exactly one option's text ("vapor") gives that option's letter."""
    text = str(text).strip()
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text)
        if m and (not options or m.group(1).upper() in options):
            return m.group(1).upper()
    if options:
        norm = normalize_text(text)
        hits = [k for k, v in options.items() if normalize_text(v) == norm]
        if len(hits) == 1:
            return hits[0]
    return None


def choice_score(prediction: str, references: Sequence[str], question: str = "") -> float:
    options = parse_options(question) or None
    got = parse_choice(prediction, options)
    wanted = {parse_choice(r, options) for r in references} - {None}
    return float(got is not None and got in wanted)


# -- numbers -----------------------------------------------------------------------------------------------
def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("about 1,200 people" -> 1200.0; "seven" -> 7.0), or None."""
    m = _NUMBER.search(str(text))
    if m:
        return float(m.group(0).replace(",", ""))
    for w in normalize_text(text).split():
        if w.isdigit():
            return float(w)
    return None


def number_score(prediction: str, references: Sequence[str], question: str = "", rel_tol: float = 1e-6,
                 abs_tol: float = 1e-9) -> float:
    got = parse_number(prediction)
    if got is None:
        return 0.0
    return float(any((r := parse_number(ref)) is not None and math.isclose(got, r, rel_tol=rel_tol, abs_tol=abs_tol)
                     for ref in references))


# -- text similarity ---------------------------------------------------------------------------------------
def exact_score(prediction: str, references: Sequence[str], question: str = "") -> float:
    p = normalize_text(prediction)
    return float(any(p == normalize_text(r) for r in references))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between normalised answers."""
    p, r = normalize_text(prediction).split(), normalize_text(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def anls(prediction: str, reference: str) -> float:
    """Average normalised Levenshtein similarity of one pair (DocVQA), before thresholding."""
    p, r = " ".join(str(prediction).lower().split()), " ".join(str(reference).lower().split())
    if not p and not r:
        return 1.0
    return 1.0 - _levenshtein(p, r) / max(len(p), len(r))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def f1_score(prediction: str, references: Sequence[str], question: str = "") -> float:
    return max(token_f1(prediction, r) for r in references)


def anls_score(prediction: str, references: Sequence[str], question: str = "") -> float:
    return max(anls(prediction, r) for r in references)


def any_score(prediction: str, references: Sequence[str], question: str = "") -> float:
    return 1.0


# -- the registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matcher:
    """A named rule: ``score`` in [0, 1]; an answer is correct when score >= ``threshold``."""

    name: str
    score: Callable[..., float]
    threshold: float = 1.0
    description: str = ""


MATCHERS: dict[str, Matcher] = {
    "exact": Matcher("exact", exact_score, 1.0, "normalised exact match with any alternative"),
    "choice": Matcher("choice", choice_score, 1.0, "multiple-choice option letter"),
    "number": Matcher("number", number_score, 1.0, "numeric equality with tolerance"),
    "f1": Matcher("f1", f1_score, 0.5, "token F1 >= threshold"),
    "anls": Matcher("anls", anls_score, 0.5, "ANLS >= threshold"),
    "any": Matcher("any", any_score, 0.0, "keep every answer"),
}
RULES = (*MATCHERS, "auto")


@dataclass(frozen=True)
class Verdict:
    """Outcome of judging one answer: which rule decided, its score, and whether that is correct."""

    correct: bool
    rule: str
    score: float


def check_rule(rule: str) -> str:
    """``rule`` itself, or a ValueError with "did you mean ...? available: ..."."""
    if rule in RULES:
        return rule
    close = difflib.get_close_matches(rule, RULES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown answer matcher {rule!r}; {hint}available: {', '.join(RULES)}")


def auto_rule(references: Sequence[str], question: str = "") -> str:
    """The rule ``auto`` picks for these references (see the module docstring)."""
    options = parse_options(question) or None
    if references and all(re.fullmatch(r"\s*\(?[A-Z]\)?\s*(?:[.:)].*)?", r, re.DOTALL) for r in references) \
            and all(parse_choice(r, options) for r in references):
        return "choice"
    if references and all(re.fullmatch(r"\s*" + _NUMBER.pattern + r"\s*", r) for r in references):
        return "number"
    if all(len(normalize_text(r).split()) <= 3 for r in references):
        return "exact"
    return "f1"


def judge(prediction: str, references: str | int | float | Sequence[str | int | float], rule: str = "exact",
          question: str = "", threshold: float | None = None) -> Verdict:
    """Judge ``prediction`` against the acceptable ``references`` with ``rule`` (see the module docstring).

    ``threshold`` overrides the rule's own (f1 / anls: 0.5)."""
    refs = _as_refs(references)
    name = check_rule(rule)
    if name == "auto":
        name = auto_rule(refs, question)
    m = MATCHERS[name]
    if not refs:
        return Verdict(name == "any", name, float(name == "any"))
    score = float(m.score(str(prediction), refs, question))
    return Verdict(score >= (m.threshold if threshold is None else threshold), name, score)
