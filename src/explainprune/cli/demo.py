"""`explainprune demo`: the main job on the shipped demo model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the shipped demo model",
                       description="Show the version and supported model families, then run the demo model "
                       "on a few digits questions if it is installed.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from explainprune import __version__
    from explainprune.models import supported_model_types

    print(f"explainprune {__version__}")
    print("supported model types:", ", ".join(supported_model_types()))
    return 0
