"""`explainprune train`: train the compressor f_θ on a label set (Eq. 3)."""

from __future__ import annotations

import argparse
import json

from explainprune.cli.common import add_device_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the compressor f_θ on labels from `explainprune label`",
        description="Train f_θ (five depthwise-separable 1-D conv layers) to predict R_v* (R_v with its bottom "
        "50% zeroed, divided by its sum) from A_v^0 with the loss KL(R_v* || f_θ(A_v^0)) (Eq. 3), Adam with "
        "default settings. Writes OUT/compressor (for `get_pruner('learned', compressor=...)`), "
        "OUT/log.jsonl (per epoch), OUT/metrics.json (validation KL, top-k recalls at 50/25/10% retention "
        "and region mass, with the uniform / random / raw-attention baselines) and a checkpoint per epoch. "
        "The guard compares f_θ with its own input (ranking by the head-mean A_v^0, the layer0 pruner) on the "
        "validation split, overall and per kind and input size, keeps the best epoch that is significantly "
        "behind the input on no kind and size (epoch 0 is the input itself) and prints a warning line when f_θ "
        "does not beat it. Train on labels of every input size you will run: several --labels are one set.",
        epilog="example: explainprune train --labels labels/ --out runs/f_theta --epochs 100\n"
        "         explainprune train --labels labels/ --out runs/f_paper --preset paper\n"
        "         explainprune train --labels labels/ --out runs/f_theta --epochs 150 --resume\n"
        "         explainprune train --labels labels/4x4 labels/8x8 labels/16f --out runs/f_sizes --epochs 30",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, nargs="+", metavar="DIR",
                   help="label directory written by `explainprune label`; several (e.g. other board sizes or frame "
                        "counts of the same model) are trained on together")
    p.add_argument("--preset", default="default", choices=["default", "paper", "v1"],
                   help="default: per-head log-normalised A_v^0, replicate padding, skip path from the input to "
                        "the logits (docs/compressor.md); paper: Section 4.1 exactly (head-averaged raw A_v^0, one "
                        "channel, zero padding, no skip, 100 epochs); v1: the default before issue 20. Options below "
                        "override it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, help="total epochs (default 100, as the paper; v1: 30)")
    p.add_argument("--batch-size", type=int, default=128, help="default 128, as the paper")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, Adam's default)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split, init and shuffling seed (default 0)")
    p.add_argument("--target-power", type=float, default=1.0,
                   help="raise the kept R_v values to this power before normalising the target R_v* (default 1: "
                        "the paper); below 1 flattens a peaked R_v so the order of its smaller values is learned")
    p.add_argument("--average-heads", action="store_true", default=None,
                   help="average A_v^0 over heads (1 input channel; the paper preset does)")
    p.add_argument("--normalize", choices=["log", "mean", "none"],
                   help="input scaling: log of each head divided by its mean over the tokens (default), that ratio "
                        "itself (mean), or none (paper)")
    p.add_argument("--padding", choices=["replicate", "reflect", "zeros"],
                   help="how the convs pad the sequence ends (default replicate; paper: zeros)")
    p.add_argument("--skip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the log head-mean A_v^0 to f_θ's logits (learned gain), so the untrained f_θ ranks as "
                        "its input (default on; paper: off)")
    p.add_argument("--select", choices=["groups", "guard", "last"], default="groups",
                   help="the epoch kept, judged on the validation split by R_v mass and region kept at 50/25/10%%: "
                        "groups (the default): the best pooled score among the epochs behind the input ranking on "
                        "no group (kind and number of visual tokens, >= 10 samples, margin below -2 standard "
                        "errors and -0.005; epoch 0 = the input itself); guard: the best pooled score; last: the "
                        "last epoch")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_device_option(p, "f_θ's training")
    p.add_argument("--json", action="store_true", help="print the final numbers as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, kept=kept)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from explainprune.cli.common import check_device
    from explainprune.cli.main import command_line
    from explainprune.labels import read_index
    from explainprune.outdir import claim_out
    from explainprune.train import preset, train

    if (args.epochs is not None and args.epochs < 1) or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    if not args.lr > 0 or not args.target_power > 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--lr, --target-power and --threads must be > 0")
    check_device(args.device)
    for labels in args.labels:
        read_index(labels)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {"epochs": args.epochs, "average_heads": args.average_heads, "normalize": args.normalize,
             "padding": args.padding, "skip": args.skip}
    config = preset(args.preset, batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
                    seed=args.seed, power=args.target_power, select=args.select,
                    **{k: v for k, v in given.items() if v is not None})
    labels = args.labels if len(args.labels) > 1 else args.labels[0]
    with claim_out(args.out, command_line(args), "train"):
        if args.resume and not (Path(args.out) / "checkpoint.json").is_file():
            print(f"explainprune train: note: --resume: {args.out} holds no checkpoint to resume; training from "
                  "epoch 1", file=sys.stderr)
        res = train(labels, args.out, config, resume=args.resume, progress=not args.no_progress,
                    **({"device": args.device} if args.device else {}))
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    else:
        print(f"trained {res.epochs} epochs on {res.train_samples} samples in {res.seconds:.1f} s; "
              f"validation ({res.val_samples} samples):")
        print(res.to_markdown())
        print(f"compressor: {args.out}/compressor (epoch {res.guard['epoch']})")
    return 0


def kept(args: argparse.Namespace) -> tuple[str, str]:
    """After Ctrl-C: the last finished epoch's checkpoint (``--resume`` continues from it)."""
    import json
    from pathlib import Path

    ptr = Path(args.out) / "checkpoint.json"
    if not ptr.is_file():
        return "no epoch had finished, nothing kept", ""
    epoch = json.loads(ptr.read_text())["epoch"]
    return f"the checkpoint of epoch {epoch} is kept in {args.out}", "--resume"
