"""The digits task's size and kind options, shared by `explainprune eval` and `explainprune label`."""

from __future__ import annotations

import argparse
from typing import Any


def add_task_options(p: argparse.ArgumentParser) -> None:
    """``--grid``, ``--cell``, ``--frames``, ``--kinds`` (defaults: the task's own)."""
    p.add_argument("--grid", type=int, help="digits board cells per side, 1-16 (default: the task's, 4)")
    p.add_argument("--cell", type=int, help="digits cell size in pixels, a multiple of 28 (default: the task's, 56)")
    p.add_argument("--frames", type=int, help="digits video frames, 1-16 (default: the task's, 4)")
    p.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="digits question kinds, space- or comma-separated: rowcol colour count video "
                   "(default: the task's, rowcol colour video)")


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The given options as ``DigitsTask`` keyword arguments, checked before any model work."""
    from explainprune.tasks.digits import KINDS, MAX_INDEX, TOKEN_PX

    options: dict[str, Any] = {}
    for name, hi in (("grid", MAX_INDEX), ("frames", MAX_INDEX)):
        value = getattr(args, name, None)
        if value is not None:
            if not 1 <= value <= hi:
                raise ValueError(f"--{name} must be 1..{hi} (the coordinate cues encode {hi} indices); got {value}")
            options[name] = value
    cell = getattr(args, "cell", None)
    if cell is not None:
        if cell < TOKEN_PX or cell % TOKEN_PX:
            raise ValueError(f"--cell must be a positive multiple of {TOKEN_PX} pixels; got {cell}")
        options["cell"] = cell
    if getattr(args, "kinds", None):
        kinds = [k.strip() for item in args.kinds for k in item.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"--kinds: unknown {' '.join(unknown) or '(none given)'}; choose from {' '.join(KINDS)}")
        options["kinds"] = tuple(kinds)
    return options


def uses_task_options(args: argparse.Namespace) -> bool:
    """Whether any of the digits options was given (they do not apply to a manifest)."""
    return any(getattr(args, k, None) is not None for k in ("grid", "cell", "frames", "kinds"))
