"""Built-in benchmark tasks (see docs/digits.md).

The names (and the ``digits`` module) are loaded on first use, so that ``python -m explainprune.tasks.digits``
runs the module once (an eager import here made runpy warn that it was already in ``sys.modules``)."""

import importlib
from typing import Any

__all__ = ["DEFAULT_KINDS", "KINDS", "DigitsSample", "DigitsTask", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name == "digits":
        return importlib.import_module("explainprune.tasks.digits")
    if name in __all__:
        return getattr(importlib.import_module("explainprune.tasks.digits"), name)
    raise AttributeError(f"module 'explainprune.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, "digits"])
