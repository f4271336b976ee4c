"""Staged training of the digits demo model (a tiny Qwen2-VL), on CPU.

  stage 1  vision tower + merger alone, with temporary per-token heads (``stage1.py``);
  stage 2  vision frozen, the language model learns to answer every question kind at every size, in the
           exact chat format the ``Qwen2VL`` adapter renders (``stage2.py``, ``questions.py``).

    python -m recipes.digits.train --init recipes/digits/checkpoints/demo_4x4 --work runs/digits13 \
        --out runs/digits13/out [--resume]

Run from the repository root (``recipes`` is not part of the installed library). Checkpoints
(``stage1.safetensors``, ``stage2.safetensors``, the stage-2 banks; safetensors + JSON, no pickles) go to
``--work``; ``--resume`` continues from them. ``--export-only`` writes ``--out`` from the latest checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from explainprune.models.offline import save_checkpoint_dir
from recipes.digits.common import TrainConfig, load_state, log
from recipes.digits.data import BoardMaker
from recipes.digits.stage1 import AuxHeads, stage1
from recipes.digits.stage2 import LLMState, stage2


def makers(cfg: TrainConfig) -> tuple[BoardMaker, BoardMaker]:
    """Glyph banks: strongly augmented TRAIN digits, task-like TEST digits (monitoring only)."""
    frames = max(max(cfg.frames), 1)
    gen = BoardMaker.for_split("train", cfg.video_grid, cfg.cell, frames, seed=cfg.seed)
    test = BoardMaker.for_split("test", cfg.video_grid, cfg.cell, frames, seed=cfg.seed, strong=False)
    return gen, test


def train(cfg: TrainConfig, resume: bool = False, stop_after: int = 2, export_only: bool = False) -> Path:
    """Run the stages (skipping finished ones when resuming) and write the checkpoint directory."""
    from recipes.digits.common import build_model

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    if not export_only:
        (work / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model, tok, proc = build_model(cfg)
    gen, test = makers(cfg)
    t0 = time.time()
    if export_only:
        load_state(work / "stage1.safetensors", {"visual": model.model.visual,
                                                 "heads": AuxHeads(cfg.hidden, cfg.max_index)})
        load_state(work / "stage2.safetensors", {"llm": LLMState(model)})
    else:
        stage1(model, cfg, work, gen, test, resume)
        log(f"stage 1 done in {time.time() - t0:.0f}s")
        if stop_after >= 2:
            stage2(model, tok, cfg, work, gen, test, resume)
            log(f"stage 2 done, total {time.time() - t0:.0f}s")
    out = save_checkpoint_dir(model.eval(), tok, proc, cfg.out)
    log(f"saved {out}")
    return out


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, f in TrainConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(f.default, tuple):
            kind = str if name == "kinds" else int
            p.add_argument(flag, nargs="+", type=kind, default=list(f.default))
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--stop-after", type=int, default=2, help="last stage to run (1 or 2)")
    p.add_argument("--export-only", action="store_true", help="write --out from --work's checkpoints")
    args = vars(p.parse_args(argv))
    extra = argparse.Namespace(**{k: args.pop(k) for k in ("resume", "stop_after", "export_only")})
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    return cfg, extra


def main(argv: list[str] | None = None) -> None:
    cfg, extra = parse(argv)
    train(cfg, resume=extra.resume, stop_after=extra.stop_after, export_only=extra.export_only)


if __name__ == "__main__":
    main()
