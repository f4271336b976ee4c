"""`explainprune` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser and sets
``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under explainprune.cli (modules appear as their features land)
SUBCOMMANDS = ("demo", "label", "train", "eval", "show", "flops")


def build_parser() -> argparse.ArgumentParser:
    from explainprune import __version__

    parser = argparse.ArgumentParser(
        prog="explainprune",
        description="Explainability-guided visual token pruning for multimodal LLMs (Qwen2-VL, Qwen2.5-VL, "
        "LLaVA-OneVision, LLaVA).",
    )
    parser.add_argument("--version", action="version", version=f"explainprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"explainprune.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"explainprune.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"explainprune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
