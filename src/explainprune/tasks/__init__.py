"""Built-in benchmark tasks (see docs/digits.md)."""

from explainprune.tasks.digits import DEFAULT_KINDS, KINDS, DigitsSample, DigitsTask, load_manifest

__all__ = ["DEFAULT_KINDS", "KINDS", "DigitsSample", "DigitsTask", "load_manifest"]
