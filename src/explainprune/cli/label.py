"""`explainprune label`: write the (A_v^0, R_v) label set that f_θ is trained on (Section 3.3, App. B)."""

from __future__ import annotations

import argparse
import json

from explainprune.cli.common import add_model_options, load_options
from explainprune.cli.task_options import add_task_options, task_options, uses_task_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label", help="label a task with a model: A_v^0 and R_v per correctly answered sample",
        description="Run a model over the digits task or a manifest; for every sample it answers correctly "
        "store the first-layer attention A_v^0 [H, N_v], the relevance R_v [N_v] (Eq. 1) and metadata as "
        "parquet shards in --out (wrong answers are counted and skipped). Rerunning the same command resumes "
        "an interrupted run; under `torchrun --nproc_per_node K` each rank labels a disjoint share.",
        epilog="examples:\n  explainprune label --model demo --task digits --limit 2000 --out labels/\n"
        "  torchrun --nproc_per_node 2 -m explainprune.cli.main label --model demo --task digits --out labels/\n"
        "  explainprune label --model ./my-qwen2-vl --manifest data/manifest.jsonl --out labels/\n"
        "  explainprune label --model Qwen/Qwen2-VL-7B-Instruct --dataset llava_video.json nextqa.json \\\n"
        "      --media-root videos/llava nextqa/videos --target 7000 --out labels/video",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or 'demo'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", choices=["digits"], help="the built-in task")
    src.add_argument("--manifest", help="JSONL: question, answer, image|images|video (paths), optional id, "
                     "region ([[frame, row, col], ...]), kind and match")
    src.add_argument("--dataset", nargs="+", metavar="PATH_OR_ID",
                     help="conversation data (LLaVA or messages format): .json/.jsonl/.parquet files, folders of "
                     "them, or hub ids; several are sampled together, each file a subset (explainprune.conversations)")
    ds = p.add_argument_group("--dataset options")
    ds.add_argument("--format", default="llava", choices=["llava", "messages"],
                    help="llava: {conversations: [{from: human|gpt, value}]}; messages: {messages: [{role, content}]}")
    ds.add_argument("--media-root", nargs="+", metavar="DIR",
                    help="folder(s) that image/video paths are relative to: one for all datasets or one per dataset "
                    "(default: each data file's folder)")
    ds.add_argument("--columns", metavar="OURS=THEIRS,...",
                    help="column names when yours differ: id, image, images, video, conversations, messages, subset")
    ds.add_argument("--turns", default="first", choices=["first", "each"],
                    help="first (default): the first question/answer pair of each conversation; each: every pair, "
                    "as its own sample with the earlier turns dropped")
    ds.add_argument("--target", type=int, nargs="+", metavar="N",
                    help="label a balanced sample of N questions (default: all), deterministic by --seed; or one N "
                    "per --dataset path (each path's share balanced over the other strata)")
    ds.add_argument("--strata", default="subset,task,duration",
                    help="what --target balances over, comma-separated from subset, task (multi-choice / "
                    "open-ended), duration (0-30 s, 30-60 s, 1-2 min, 2-3 min) (default: all three)")
    ds.add_argument("--hub-subset", help="a hub dataset's configuration name")
    ds.add_argument("--hub-split", default="train", help="a hub dataset's split (default train)")
    p.add_argument("--out", required=True, help="output directory (resumed when it holds the same run)")
    p.add_argument("--limit", type=int, help="number of samples (digits default 2000; manifest: all lines)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="digits split (default train)")
    p.add_argument("--seed", type=int, default=0, help="digits task seed; --dataset sampling seed (default 0)")
    add_task_options(p)
    p.add_argument("--max-frames", type=int, default=8, help="frames sampled from a manifest or dataset video file")
    p.add_argument("--match", default=None,
                   help="answer matcher: exact, choice, number, f1, anls, any, auto (default: exact for --task and "
                   "--manifest, where a line's own 'match' wins; auto for --dataset: choice for option letters, "
                   "number for numbers, exact for short answers, f1 otherwise). See docs/matchers.md")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    p.add_argument("--rule", default="grad", choices=["grad", "mean"], help="relevance rule (default grad)")
    p.add_argument("--no-clamp", action="store_true", help="Eq. 1 as printed (no positive part)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    p.add_argument("--head-chunk", type=int, default=None, metavar="C",
                   help="compute R_v with the attention maps built C heads at a time: less peak memory for "
                        "many-head models (docs/relevance.md), same numbers up to float rounding (default: all "
                        "heads at once)")
    p.add_argument("--keep-wrong", action="store_true",
                   help="also store wrongly answered samples (flagged correct=false; R_v of the model's own "
                   "answer). The paper keeps only correct ones (Appendix B)")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a sample whose image/video cannot be read: stop the run (default; finished shards are "
                   "kept) or skip it (listed in the summary and index.json)")
    p.add_argument("--json", action="store_true", help="print the final numbers as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=run, kept=kept)


def make_source(args: argparse.Namespace):
    from explainprune.labels import DigitsSource, ManifestSource

    if (args.dataset or args.manifest) and uses_task_options(args):
        raise ValueError("--grid, --cell, --frames and --kinds apply to --task digits, not to --manifest / --dataset")
    if args.dataset:
        from explainprune.conversations import ConversationSource, DatasetConfig, parse_columns

        config = DatasetConfig(tuple(args.dataset), format=args.format,
                               media_root=tuple(args.media_root) if args.media_root else None,
                               columns=parse_columns(args.columns), split=args.hub_split, subset=args.hub_subset,
                               turns=args.turns, max_frames=args.max_frames, match=args.match or "auto",
                               target=tuple(args.target) if args.target else args.limit,
                               strata=tuple(s.strip() for s in args.strata.split(",") if s.strip()), seed=args.seed)
        source = ConversationSource(config, progress=not args.no_progress)
        source.validate(on_error=args.on_error)
        return source
    if args.manifest:
        return ManifestSource(args.manifest, limit=args.limit, max_frames=args.max_frames, on_error=args.on_error)
    options = task_options(args)
    n = 2000 if args.limit is None else args.limit
    return DigitsSource(split=args.split, seed=args.seed, n=n, **options)


def run(args: argparse.Namespace) -> int:
    import explainprune
    from explainprune.cli.main import command_line
    from explainprune.identity import config_fingerprint, model_identity
    from explainprune.label_run import _run_record, check_resumable
    from explainprune.labels import LabelConfig, dist_info, label, rank_device
    from explainprune.outdir import claim_out
    from explainprune.sources import check_limit

    check_limit(args.limit)
    for flag in ("shard_size", "max_new_tokens", "max_frames", "head_chunk"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    source = make_source(args)
    if args.match is not None:
        from explainprune.matchers import check_rule

        check_rule(args.match)
    options = load_options(args)
    config = LabelConfig(shard_size=args.shard_size, rule=args.rule, clamp=not args.no_clamp,
                         max_new_tokens=args.max_new_tokens, keep_wrong=args.keep_wrong, head_chunk=args.head_chunk,
                         match=args.match if args.match and not args.dataset else "exact")
    rank, _ = dist_info()
    # under torchrun rank 0 holds the --out lock for its group (torchrun stops the others if it is refused)
    with claim_out(args.out, command_line(args), "labels", lock=rank == 0):
        # the model's identity and architecture from its small files: a resume of another model, dtype or
        # processor setting is refused here, before the model loads
        identity = model_identity(args.model, **options)
        check_resumable(args.out, _run_record(source, config, config_fingerprint(args.model), identity))
        if "device_map" not in options:  # under torchrun with CUDA: rank r on cuda:LOCAL_RANK (cuda or no --device)
            device = rank_device(options.pop("device", None))
            options.update({"device": device} if device is not None else {})
        vlm = explainprune.load(args.model, **options)
        rep = label(vlm, source, args.out, config, progress=not args.no_progress, on_error=args.on_error,
                    identity=identity)
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
    elif rep.rank == 0:
        t = rep.totals
        if rep.complete and t:
            print(f"{args.out}: {t['labeled']} samples labelled, {t['skipped_wrong']} skipped (wrong answer) "
                  f"of {t['samples']} ({t['wrong']} answered wrongly); this run: {rep.shards_written} shards in "
                  f"{rep.seconds:.1f} s, {rep.shards_reused} reused")
            for rule, c in t.get("by_rule", {}).items():
                print(f"  matcher {rule}: {c['correct']} of {c['judged']} answers correct")
            if rep.errors:
                print(f"{len(rep.errors)} skipped (media unreadable; listed in {args.out}/index.json):")
                for e in rep.errors[:10]:
                    print(f"  line {e['line']}, sample {e['id']}: {e['error']}")
        else:
            print(f"{args.out}: rank 0 done ({rep.labeled} labelled, {rep.skipped_wrong} skipped); "
                  "other ranks still running")
    return 0


def kept(args: argparse.Namespace) -> tuple[str, str]:
    """After Ctrl-C: how many finished shards --out holds (rerunning the command resumes from them)."""
    from pathlib import Path

    done = len(list((Path(args.out) / "shards").glob("*.parquet")))
    return f"{done} finished shard{'s' if done != 1 else ''} kept in {args.out}", ""
