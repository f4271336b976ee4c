"""`explainprune demo`: the main job on the shipped demo model (what `make demo` runs)."""

from __future__ import annotations

import argparse
import json

from explainprune.cli.common import add_model_options, load_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="label, train f_θ, evaluate and draw on the shipped demo model",
        description="The whole method end to end on the shipped digits model: relevance labels (A_v^0, R_v) on "
        "the train split, the compressor f_θ trained on them, then vanilla / oracle / learned / layer0 and "
        "the training-free baselines (FastV, PyramidDrop, DART, DivPrune, VisionZip, random, "
        "uniform) at 50/25/10% retention on the test split (images and videos), report files, relevance pictures, "
        "and the table. Re-running with the same --out resumes finished steps.",
        epilog="example: explainprune demo --quick --out runs/demo-quick")
    p.add_argument("--quick", action="store_true", help="smaller run (fewer labels, epochs and test samples)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo, runs/demo-quick with --quick)")
    p.add_argument("--model", default="demo", help="model to run (default: the shipped 'demo')")
    p.add_argument("--label-samples", type=int, help="digits train samples to label")
    p.add_argument("--epochs", type=int, help="compressor training epochs")
    p.add_argument("--eval-samples", type=int, help="digits test samples to evaluate")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1: fastest for the small demo model)")
    p.add_argument("--json", action="store_true", help="print every number as JSON at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    p.set_defaults(func=run, kept=kept)


def run(args: argparse.Namespace) -> int:
    from explainprune import __version__
    from explainprune.demo import DemoConfig, run_demo, summary

    overrides = {k: v for k, v in {"model": args.model, "label_samples": args.label_samples,
                                   "epochs": args.epochs, "eval_samples": args.eval_samples, "threads": args.threads,
                                   "progress": not args.no_progress}.items() if v is not None}
    overrides["out"] = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    overrides["model_options"] = load_options(args)
    for key in ("label_samples", "epochs", "eval_samples", "threads"):
        if key in overrides and overrides[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1; got {overrides[key]}")
    from explainprune.cli.main import command_line
    from explainprune.outdir import claim_out

    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    with claim_out(overrides["out"], command_line(args), "demo"):
        print(f"explainprune {__version__} demo -> {config.out}")
        result = run_demo(config)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, default=str))
    else:
        print(summary(result))
    return 0


def kept(args: argparse.Namespace) -> tuple[str, str]:
    """After Ctrl-C: the finished steps (labels shards, training checkpoints, eval records) stay in --out."""
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    return f"the finished work (label shards, the last training epoch, eval records) is kept in {out}", ""
