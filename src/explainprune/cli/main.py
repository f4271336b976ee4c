"""`explainprune` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser and sets ``func``
(called with the parsed args, returns an exit code) and optionally ``kept`` (called after Ctrl-C with the
args: a sentence saying what was kept on disk). Errors print one line ``explainprune <cmd>: error: ...``
(exit 2 for bad input, 1 otherwise); ``--debug`` shows the traceback instead. Ctrl-C prints what was kept
and the command that resumes it (exit 130).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# subcommand -> module under explainprune.cli (modules appear as their features land)
SUBCOMMANDS = ("demo", "label", "train", "eval", "show", "flops", "lmms_task")
DEBUG_HELP = "show the Python traceback of an error (for bug reports)"


def build_parser() -> argparse.ArgumentParser:
    from explainprune import __version__

    parser = argparse.ArgumentParser(
        prog="explainprune", allow_abbrev=False,
        description="Explainability-guided visual token pruning for multimodal LLMs (Qwen2-VL, Qwen2.5-VL, "
        "LLaVA-OneVision, LLaVA).",
    )
    parser.add_argument("--version", action="version", version=f"explainprune {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"explainprune.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"explainprune.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    for p in sub.choices.values():  # `explainprune label ... --debug` works too
        p.allow_abbrev = False  # `--max-pix 1000` is an error, not a silent --max-pixels
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def command_line(args: argparse.Namespace) -> str:
    """The command line that started this run (for the --out lock), as typed."""
    return "explainprune " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])


def resume_command(argv: list[str], extra: str = "") -> str:
    """The command line that reran ``argv`` (plus ``extra`` when it is not there yet)."""
    args = list(argv)
    if extra and extra not in args:
        args.append(extra)
    return "explainprune " + shlex.join(args)


def main(argv: list[str] | None = None) -> int:
    from explainprune.errors import InputError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prefix = f"explainprune {args.command}:"
    args.argv = argv  # the command line (`outdir.claim_out` writes it in the --out lock)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        kept = getattr(args, "kept", None)
        what, extra = kept(args) if kept else ("nothing was written", "")
        again = f"; to resume: {resume_command(argv, extra)}" if extra is not None and kept else ""
        print(f"\n{prefix} interrupted: {what}{again}", file=sys.stderr)
        return 130
    except (InputError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"{prefix} error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, or an environment problem: one line, the traceback with --debug
        if args.debug:
            raise
        from explainprune.files import disk_full, is_disk_full

        if is_disk_full(err):  # a write outside files.atomic_path (an appended log line, ...)
            where = getattr(err, "filename", None) or f"under --out {getattr(args, 'out', None) or '.'}"
            print(f"{prefix} error: {disk_full(where)}", file=sys.stderr)
            return 2
        print(f"{prefix} error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
