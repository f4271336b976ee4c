"""`explainprune flops`: the Appendix-D FLOPs accounting (Eq. 4-6) of a method on a model shape at a ratio."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops", help="print the Appendix-D FLOPs accounting (Eq. 4-6) of a method",
        description="FLOPs of the visual-token part of the LLM (Eq. 4, per layer with that layer's visual "
        "tokens) plus the method's own overhead, both from the pruner itself (as `explainprune eval` counts "
        "them): the compressor's Eq. 5 first-layer attention and Eq. 6 convs for 'learned', each baseline's "
        "selection cost, the stages of in-LLM methods (fastv, dart, pdrop, ...). "
        "Give --model (a checkpoint directory or 'demo'; only its config is read) or the shape by hand.",
        epilog="examples (the paper's setting): explainprune flops --hidden 3584 --intermediate 18944 "
        "--layers 28 --visual-tokens 1568 --ratio 0.25 --method learned;  ... --method pdrop:lam=0.5")
    p.add_argument("--model", help="checkpoint directory, hub id or 'demo' (reads config.json only)")
    p.add_argument("--hidden", type=int, help="hidden size d")
    p.add_argument("--intermediate", type=int, help="FFN intermediate size m")
    p.add_argument("--layers", type=int, help="number of LLM layers N_L")
    p.add_argument("--ffn-matrices", type=int, default=3, help="matrices per FFN block l (default 3)")
    p.add_argument("--visual-tokens", type=int, required=True, help="visual tokens n before pruning")
    p.add_argument("--ratio", type=float, default=1.0, help="retention ratio in (0, 1] (default 1)")
    p.add_argument("--method", default="learned",
                   help="a registered method, with options as in `eval --methods` (e.g. 'fastv:layer=3', "
                   "'pdrop:lam=0.5'); default learned")
    p.add_argument("--fastv-layer", type=int, help="FastV's K (same as --method fastv:layer=K): layers 0..K-1 "
                   "see every token (default 2)")
    p.add_argument("--compressor", help="a saved compressor directory or hub id org/name for 'learned' (its "
                   "channels; default the paper's 1 -> 32, 64, 128, 256, 512 -> 1, k=3)")
    p.add_argument("--text-tokens", type=int, default=16, help="instruction tokens M, for methods whose selection "
                   "reads the question (cdpruner: N·M·d); default 16")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _shape(args: argparse.Namespace):
    from explainprune.cost import LLMShape

    if args.model and any(getattr(args, n) is not None for n in ("hidden", "intermediate", "layers")):
        raise ValueError("give either --model or --hidden/--intermediate/--layers, not both")
    if args.model:
        from explainprune.errors import InputError
        from explainprune.models import supported_model_types
        from explainprune.models.hub import checkpoint_file, resolve

        config_file = checkpoint_file(resolve(args.model), "config.json")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"not valid JSON ({err})", file=config_file) from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in supported_model_types():
            raise InputError(f"model_type {model_type!r} is not a supported multimodal model (supported: "
                             f"{', '.join(supported_model_types())})", file=config_file,
                             hint="give its shape with --hidden/--intermediate/--layers instead")
        vision = config.get("vision_config")
        try:  # as the runner reads the loaded model's configs (MoE experts per token included)
            shape = LLMShape.from_config(config.get("text_config", config), vision if isinstance(vision, dict)
                                         else None, args.ffn_matrices)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            raise InputError(f"its text config lacks a usable {err}", file=config_file) from None
    else:
        missing = [f"--{n}" for n in ("hidden", "intermediate", "layers") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"give --model, or the shape: missing {', '.join(missing)}")
        shape = LLMShape(args.hidden, args.intermediate, args.layers, args.ffn_matrices)
    for flag, value in (("--hidden", shape.hidden), ("--intermediate", shape.intermediate),
                        ("--layers", shape.layers), ("--ffn-matrices", shape.ffn_matrices)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1; got {value}")
    return shape


def method(spec: str, fastv_layer: int | None = None, compressor: str | None = None):
    """(label, pruner) for ``spec`` as ``eval --methods`` builds it (unknown names: did-you-mean). 'learned'
    without a compressor gets an untrained one of the paper's shape (only its channels are counted)."""
    from explainprune.evaluation.runner import parse_method
    from explainprune.pruning import get_pruner

    name, options = parse_method(spec)
    if fastv_layer is not None:
        if name != "fastv":
            raise ValueError(f"--fastv-layer is for --method fastv; got --method {spec}")
        options.setdefault("layer", fastv_layer)
    if compressor is not None:
        if name != "learned":
            raise ValueError(f"--compressor is for --method learned; got --method {spec}")
        options.setdefault("compressor", compressor)
    if name == "learned" and "compressor" not in options:
        from explainprune.compressor import Compressor
        from explainprune.cost import PAPER_COMPRESSOR

        options["compressor"] = Compressor(**PAPER_COMPRESSOR)
    return spec, get_pruner(name, **options)


def run(args: argparse.Namespace) -> int:
    import torch

    from explainprune.cost import method_account
    from explainprune.pruning.base import select

    select(torch.ones(1), args.ratio)  # validates the ratio with the usual message
    if args.visual_tokens < 1:
        raise ValueError(f"--visual-tokens must be >= 1; got {args.visual_tokens}")
    label, pruner = method(args.method, args.fastv_layer, args.compressor)
    shape = _shape(args)
    layer = getattr(pruner, "layer", 0)
    if args.fastv_layer is not None and not 1 <= layer < shape.layers:
        raise ValueError(f"--fastv-layer must be in 1..{shape.layers - 1} (the model has {shape.layers} layers); "
                         f"got {layer}")
    if hasattr(pruner, "text_tokens"):  # a selection that reads the question (cdpruner)
        pruner.text_tokens = args.text_tokens
    acc = method_account(pruner, shape, args.visual_tokens, args.ratio)
    nominal = bool(getattr(pruner, "count_from_media", False))
    note = (f"note: {label}'s kept count follows the media (frames, grids), not the ratio alone: these are its "
            "nominal counts; `explainprune eval` counts what each sample kept")
    if args.json:
        print(json.dumps({"method": label, **acc.to_json(), "nominal": nominal}, indent=2))
    else:
        print(f"Appendix-D FLOPs, method {label}\n")
        print(acc.to_markdown())
        if nominal:
            print(f"\n{note}")
    return 0

