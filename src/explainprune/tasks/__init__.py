"""Built-in benchmark tasks (see docs/digits.md).

The names are loaded on first use, so that ``python -m explainprune.tasks.digits`` runs the module once
(an eager import here made runpy warn that it was already in ``sys.modules``)."""

from typing import Any

__all__ = ["DEFAULT_KINDS", "KINDS", "DigitsSample", "DigitsTask", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from explainprune.tasks import digits

        return getattr(digits, name)
    raise AttributeError(f"module 'explainprune.tasks' has no attribute {name!r}")
