"""Options shared by the subcommands that load a model (label, eval, show, demo): one definition here.

``add_model_options(parser)`` registers --device, --dtype, --attn-implementation, --device-map and the
Qwen processor's --min-pixels / --max-pixels; ``load_options(args)`` turns them into keyword arguments of
``explainprune.load``. The defaults (cpu, the checkpoint's own dtype, sdpa) are right for the CPU demo.
"""

from __future__ import annotations

import argparse
from typing import Any

from explainprune.validation import check_pixel_options

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_arg(value: str) -> str:
    """argparse type: a torch device string (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps") from None
    return value


def device_map_arg(value: str) -> str:
    """argparse type: an accelerate placement strategy or one device for the whole model."""
    if value in DEVICE_MAP_STRATEGIES:
        return value
    try:
        return device_arg(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a device map; accepted: {', '.join(DEVICE_MAP_STRATEGIES)} or a device "
            "(cuda, cuda:1, cpu)") from None


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {n}")
    return n


def add_device_option(parser: argparse.ArgumentParser | Any, what: str = "the model") -> None:
    parser.add_argument("--device", type=device_arg, default=None,
                        help=f"torch device for {what}: cpu (default), cuda, cuda:1, mps")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Register the model-loading options on ``parser`` (a subcommand's parser)."""
    DTYPES = ("auto", "float32", "bfloat16", "float16")

    g = parser.add_argument_group("model loading (see explainprune.load)")
    add_device_option(g, "the whole model")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype: auto (the checkpoint's own; default), float32, bfloat16, float16")
    g.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default="sdpa",
                   help="attention kernel of the model (default sdpa); relevance switches layers to eager itself")
    g.add_argument("--device-map", type=device_map_arg, default=None, metavar="MAP",
                   help="place the model with accelerate instead of --device: auto (spread over the visible GPUs, "
                   "then CPU), balanced, sequential, or one device such as cuda (needs explainprune[gpu])")
    g.add_argument("--min-pixels", type=positive_int, default=None, metavar="N",
                   help="Qwen image processor: fewest pixels an image is resized to (default: the checkpoint's)")
    g.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                   help="Qwen image processor: most pixels an image is resized to, which caps the visual "
                   "tokens at max_pixels / 784 (default: the checkpoint's)")


def check_device(value: str | None, flag: str = "--device") -> None:
    """Refuse a CUDA / MPS device this torch cannot use, in one line before anything loads."""
    if value is None or value in DEVICE_MAP_STRATEGIES:
        return
    import torch

    from explainprune.errors import InputError

    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            what = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
            raise InputError(f"{flag} {value}: this torch ({torch.__version__}) {what}",
                             hint="use --device cpu, or install a CUDA build of torch / check the driver and "
                             "CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        if device.index is not None and 0 < count <= device.index:
            raise InputError(f"{flag} {value}: only {count} CUDA GPU{'s' if count > 1 else ''} visible "
                             f"(cuda:0..cuda:{count - 1})", hint="give an index below the count")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{flag} {value}: MPS is not available on this machine", hint="use --device cpu")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``explainprune.load`` from the options of ``add_model_options`` (a CUDA device on a
    CPU-only torch is refused here, before anything loads)."""
    if args.device is not None and args.device_map is not None:
        raise ValueError("give --device or --device-map, not both (--device-map places the model itself)")
    check_device(args.device)
    check_device(args.device_map, "--device-map")
    check_pixel_options(args.min_pixels, args.max_pixels)
    options: dict[str, Any] = {"dtype": args.dtype, "attn_implementation": args.attn_implementation}
    for key in ("device", "device_map", "min_pixels", "max_pixels"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options
