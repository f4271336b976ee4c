"""`explainprune eval`: accuracy, preservation, retention over layers, FLOPs, times and KV cache per
method and retention ratio; writes report.json, report.md and two plots."""

from __future__ import annotations

import argparse
import json

from explainprune.cli.common import add_model_options, load_options
from explainprune.cli.task_options import add_task_options, task_options, uses_task_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    from explainprune.evaluation import DEFAULT_METHODS, DEFAULT_RATIOS, METHODS
    from explainprune.plugins import names as plugin_names

    plugins = [n for n in plugin_names() if n not in METHODS]  # installed packages' pruners (metadata only)

    p = sub.add_parser(
        "eval", help="evaluate pruning methods x retention ratios on a task",
        description="Run every method at every retention ratio on the task's samples (vanilla once, as the "
        "baseline) and report accuracy, preservation vs vanilla (%), average retention over LLM layers, "
        "FLOPs (Appendix D), prefill / decode time and KV-cache size. Writes report.json, report.md and "
        "preservation_vs_{retention,flops}.png to --out.",
        epilog="example: explainprune eval --model demo --methods vanilla learned fastv random "
        "--compressor runs/compressor --limit 100 --out runs/eval")
    p.add_argument("--model", default="demo", help="checkpoint directory, hub id, or 'demo' (default)")
    p.add_argument("--task", default="digits", help="'digits' (default) or a manifest .jsonl / directory")
    p.add_argument("--split", default="test", help="digits split (default test)")
    p.add_argument("--seed", type=int, default=0, help="digits question seed (default 0)")
    p.add_argument("--limit", type=int, help="number of samples (digits default 200; manifest: all)")
    add_task_options(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="registry names, options as name:key=value,... e.g. fastv:layer=4 "
                   f"(default: {' '.join(DEFAULT_METHODS)}; available: {' '.join(METHODS)}"
                   + (f"; plug-ins: {' '.join(plugins)}" if plugins else "") + "; e.g. "
                   "oracle:rule=mean is Table 4's head-mean ablation)")
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS),
                   help="retention ratios (default 0.5 0.25 0.1)")
    p.add_argument("--compressor", help="trained compressor: a directory or a hub id org/name, given to 'learned'")
    p.add_argument("--fastv-layer", type=int, help="K for 'fastv' (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap (default 8)")
    p.add_argument("--out", default="runs/eval",
                   help="output directory (default runs/eval); the same command resumes the evaluation it holds, "
                   "another evaluation there is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another evaluation's files in --out (records.jsonl, report.*, plots) instead of "
                   "refusing")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a sample whose image/video cannot be read: stop (default; finished samples are kept in "
                   "OUT/records.jsonl and a rerun resumes) or skip it (listed in the report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the aggregate results as JSON")
    add_model_options(p)
    p.set_defaults(func=run, kept=kept)


def run(args: argparse.Namespace) -> int:
    from explainprune.cli.main import command_line
    from explainprune.evaluation.runner import EvalConfig, evaluate
    from explainprune.evaluation.tasks import TaskConfig
    from explainprune.outdir import claim_out

    options: dict[str, dict] = {}
    if args.compressor:
        options["learned"] = {"compressor": args.compressor}
    if args.limit is not None:
        from explainprune.sources import check_limit

        check_limit(args.limit)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.fastv_layer is not None:
        options["fastv"] = {"layer": args.fastv_layer}
    config = EvalConfig(methods=tuple(args.methods), ratios=tuple(args.ratios), max_new_tokens=args.max_new_tokens,
                        method_options=options, progress=not args.no_progress)
    if args.task != "digits" and uses_task_options(args):
        raise ValueError("--grid, --cell, --frames and --kinds apply to --task digits, not to a manifest")
    task = TaskConfig(name=args.task, split=args.split, seed=args.seed, limit=args.limit,
                      options=task_options(args))
    options = load_options(args)
    with claim_out(args.out, command_line(args), "eval"):
        report, paths = evaluate(args.model, task, config, out=args.out, plots=not args.no_plots,
                                 on_error=args.on_error, load_options=options, overwrite=args.overwrite)
    if args.json:
        data = report.to_json()
        print(json.dumps({"results": data["results"], "files": {k: str(v) for k, v in paths.items()}}, indent=1))
    else:
        print(report.to_markdown())
        if report.skipped:
            print(f"{len(report.skipped)} samples skipped (unreadable media): "
                  + ", ".join(f"line {e['line']} ({e['id']})" for e in report.skipped[:10]))
        print("files written:")
        for path in paths.values():
            print(f"  {path}")
    return 0


def kept(args: argparse.Namespace) -> tuple[str, str]:
    """After Ctrl-C: how many samples OUT/records.jsonl holds (the same command resumes from them)."""
    from pathlib import Path

    path = Path(args.out) / "records.jsonl"
    n = max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0
    return f"{n} finished sample{'s' if n != 1 else ''} kept in {path}", ""
