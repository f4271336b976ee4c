"""`explainprune show`: a picture of R_v (Eq. 1) over an image or video and the pruning it implies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explainprune.cli.common import add_model_options, load_options

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show", help="draw the relevance of each visual token (Eq. 1) and the kept/pruned tokens",
        description="Answer QUESTION about an image or video (or explain --answer), compute each visual "
        "token's relevance R_v to that answer (Eq. 1 of the paper) and write a PNG like the paper's Figure 2: "
        "the relevance heatmap over the picture (each frame of a video) and the picture with the pruned "
        "tokens whitened at --ratio. With --compressor (or --compare PRUNER) a second row shows the "
        "predicted scores.",
        epilog="example: explainprune show --model demo --image digits.png --question 'what digit is in row 2, "
        "column 3?' --ratio 0.25 --out fig.png")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or 'demo'")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image file (repeat for several images)")
    p.add_argument("--video", metavar="FILE_OR_DIR",
                   help="a video file (decoded with PyAV) or a directory of frame images (sorted by name)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled evenly from a video file (default 8)")
    p.add_argument("--question", required=True, help="the instruction / question about the picture")
    p.add_argument("--answer", help="the answer to explain (default: the model's own greedy answer)")
    p.add_argument("--ratio", type=float, default=0.25, help="share of visual tokens kept (default 0.25)")
    p.add_argument("--rule", default="grad", choices=("grad", "mean"),
                   help="grad: Eq. 1, gradient-weighted heads (default); mean: plain head mean (Table 4)")
    p.add_argument("--no-clamp", action="store_true",
                   help="Eq. 1 as printed (keep negative A*grad terms); default keeps the positive part")
    p.add_argument("--compressor", metavar="DIR_OR_ID",
                   help="a trained compressor f_θ (a directory or a hub id org/name): adds a predicted-relevance row")
    p.add_argument("--compare", metavar="PRUNER", help="a registered pruner whose scores form the second row")
    p.add_argument("--max-new-tokens", type=int, default=16, help="length limit of the generated answer")
    p.add_argument("--out", default="relevance.png", help="PNG to write (default relevance.png)")
    p.add_argument("--json", action="store_true", help="print the numbers (answer, scores, kept) as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def read_frames(path: str | Path, count: int = 8) -> list:
    """Frames of a video: the images of a directory (sorted), or ``count`` frames spread over a file."""
    from explainprune.images import open_image

    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [open_image(f) for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    from explainprune.sources import read_video

    return read_video(path, max(1, count))  # decodes only the sampled frames (seeking)


def run(args: argparse.Namespace) -> int:
    import torch

    from explainprune.errors import InputError
    from explainprune.files import check_out_file
    from explainprune.images import open_image
    from explainprune.models import load
    from explainprune.pruning.base import select
    from explainprune.visualize import show

    options = load_options(args)
    if not args.image and not args.video:
        raise ValueError("give --image FILE and/or --video FILE_OR_DIR")
    if not args.question.strip():
        raise InputError("--question is empty")
    if args.frames < 1 or args.max_new_tokens < 1:
        raise InputError("--frames and --max-new-tokens must be >= 1")
    select(torch.ones(1), args.ratio)  # the ratio, checked with the usual message
    for f in args.image:
        if not Path(f).is_file():
            raise FileNotFoundError(f"no image at {f}")
    try:
        images = [open_image(f) for f in args.image] or None
        video = read_frames(args.video, args.frames) if args.video else None
    except (InputError, FileNotFoundError):
        raise
    except Exception as err:  # PIL / PyAV errors for damaged files
        raise InputError(f"cannot read {' '.join(args.image) or args.video} ({type(err).__name__}: {err})") from None
    if args.compressor:
        from explainprune.compressor import Compressor
        from explainprune.compressor_path import compressor_dir

        args.compressor = compressor_dir(args.compressor)  # a training run folder too
        Compressor.from_pretrained(args.compressor)
    if args.compare:
        from explainprune.pruning import get_pruner

        get_pruner(args.compare)
    check_out_file(args.out)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    vlm = load(args.model, **options)
    print("generating and explaining the answer (Eq. 1) ...", file=sys.stderr, flush=True)
    result = show(vlm, args.question, images=images, video=video, answer=args.answer, ratio=args.ratio,
                  out=args.out, rule=args.rule, clamp=not args.no_clamp, compressor=args.compressor,
                  compare=args.compare, max_new_tokens=args.max_new_tokens, progress=True)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        pic = result.picture
        print(f"answer: {result.relevance.answer!r}")
        print(f"kept {len(result.keep)} of {len(result.relevance.scores)} visual tokens (ratio {args.ratio})")
        print(f"wrote {pic.path} ({pic.width}x{pic.height})")
    return 0
