"""`explainprune lmms-task`: write the digits benchmark as lmms-eval tasks (``--include_path DIR``)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lmms-task", help="write the digits benchmark as lmms-eval tasks (for --include_path)",
        description="Export digits samples (images, and videos as lossless files) and the lmms-eval tasks "
        "explainprune_digits, explainprune_digits_image and explainprune_digits_video (generated answers) and "
        "explainprune_digits_mc (multiple choice over the digits 0-9, scored by loglikelihood) (YAML + utils.py) "
        "into --out. lmms-eval then reads them offline with --include_path OUT. OUT/data/manifest.jsonl holds the "
        "same samples for `explainprune eval --task`.",
        epilog="example: explainprune lmms-task --out runs/lmms_tasks && python -m lmms_eval --model explainprune "
        "--model_args pretrained=demo,method=fastv,ratio=0.25 --tasks explainprune_digits "
        "--include_path runs/lmms_tasks --device cpu --output_path runs/lmms")
    p.add_argument("--out", required=True, help="task directory to write")
    p.add_argument("--n", type=int, default=200, help="digits samples (default 200, as `explainprune eval`)")
    p.add_argument("--split", default="test", help="digits split (default test)")
    p.add_argument("--seed", type=int, default=0, help="digits question seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap in the tasks (default 8)")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from explainprune.files import check_out_dir
    from explainprune.integrations.lmms_eval.task import write_task

    if args.n < 1:
        raise ValueError(f"--n must be at least 1; got {args.n}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    check_out_dir(args.out)  # a file, read-only or full --out: one line before anything is written
    res = write_task(args.out, n=args.n, split=args.split, seed=args.seed, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"tasks": {k: str(v) for k, v in res["tasks"].items()}, "manifest": str(res["manifest"]),
                          "counts": res["counts"]}, indent=1))
    else:
        for name, path in res["tasks"].items():
            print(f"{name}: {path}")
        print(f"samples: {res['counts']}; manifest for `explainprune eval --task`: {res['manifest']}")
        print(f"use: python -m lmms_eval --include_path {args.out} --tasks explainprune_digits ...")
    return 0
