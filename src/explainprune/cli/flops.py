"""`explainprune flops`: the Appendix-D FLOPs accounting (Eq. 4-6) for a model shape and a retention ratio."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops", help="print the Appendix-D FLOPs accounting (Eq. 4-6)",
        description="FLOPs of the visual-token part of the LLM (Eq. 4, per layer with that layer's kept "
        "tokens) plus the compressor's overhead (Eq. 5 first-layer attention, Eq. 6 convs) for 'learned'. "
        "Give --model (a checkpoint directory or 'demo'; only its config is read) or the shape by hand.",
        epilog="example (the paper's setting): explainprune flops --hidden 3584 --intermediate 18944 "
        "--layers 28 --visual-tokens 1568 --ratio 0.25 --method learned")
    p.add_argument("--model", help="checkpoint directory, hub id or 'demo' (reads config.json only)")
    p.add_argument("--hidden", type=int, help="hidden size d")
    p.add_argument("--intermediate", type=int, help="FFN intermediate size m")
    p.add_argument("--layers", type=int, help="number of LLM layers N_L")
    p.add_argument("--ffn-matrices", type=int, default=3, help="matrices per FFN block l (default 3)")
    p.add_argument("--visual-tokens", type=int, required=True, help="visual tokens n before pruning")
    p.add_argument("--ratio", type=float, default=1.0, help="retention ratio in (0, 1] (default 1)")
    p.add_argument("--method", default="learned",
                   help="'learned' (before the LLM, + compressor overhead), 'fastv' (from --fastv-layer), "
                   "or any other name (before the LLM, no overhead); default learned")
    p.add_argument("--fastv-layer", type=int, default=2, help="FastV's K: layers 0..K-1 see every token")
    p.add_argument("--compressor", help="a saved compressor directory (its channels; default the paper's "
                   "1 -> 32, 64, 128, 256, 512 -> 1, k=3)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _shape(args: argparse.Namespace):
    from explainprune.evaluation.flops import LLMShape

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
        text = config.get("text_config", config)
        try:
            shape = LLMShape(int(text["hidden_size"]), int(text["intermediate_size"]),
                             int(text["num_hidden_layers"]), args.ffn_matrices)
        except (KeyError, TypeError, ValueError) as err:
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
    if args.method == "fastv" and not 1 <= args.fastv_layer < shape.layers:
        raise ValueError(f"--fastv-layer must be in 1..{shape.layers - 1} (the model has {shape.layers} layers); "
                         f"got {args.fastv_layer}")
    return shape


def run(args: argparse.Namespace) -> int:
    import torch

    from explainprune.evaluation.flops import PAPER_COMPRESSOR, account, compressor_channels
    from explainprune.pruning.base import select

    select(torch.ones(1), args.ratio)  # validates the ratio with the usual message
    if args.visual_tokens < 1:
        raise ValueError(f"--visual-tokens must be >= 1; got {args.visual_tokens}")
    shape = _shape(args)
    layer = args.fastv_layer if args.method == "fastv" else 0
    compressor = None
    if args.method == "learned":
        compressor = dict(PAPER_COMPRESSOR)
        if args.compressor:
            from explainprune.compressor import Compressor

            compressor = compressor_channels(Compressor.from_pretrained(args.compressor))
    acc = account(shape, args.visual_tokens, args.ratio, layer, compressor=compressor)
    if args.json:
        print(json.dumps({"method": args.method, **acc.to_json()}, indent=2))
    else:
        print(f"Appendix-D FLOPs, method {args.method}\n")
        print(acc.to_markdown())
    return 0
