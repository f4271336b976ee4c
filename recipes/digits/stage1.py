"""Stage 1 of the digits recipe: the vision tower + merger alone, with temporary per-token heads that
classify each merged token's cell digit (or blank), row, column, frame and colour mark, on boards of every
grid size (batch sized by a visual-token budget) and every frame index, with strong augmentation."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recipes.digits.common import MatmulPatchEmbed, TrainConfig, load_state, log, lr_at, save_state, vision_tokens
from recipes.digits.data import BoardMaker, Boards


class AuxHeads(nn.Module):
    """Temporary per-token classifiers (digit+blank, row, column, frame, mark) on the merger's output."""

    def __init__(self, hidden: int, max_index: int = 16):
        super().__init__()
        sizes = {"digit": 11, "row": max_index, "col": max_index, "frame": max_index, "mark": 4}
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in sizes.items()})

    def forward(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, acc = tokens.new_zeros(()), {}
        for k, head in self.heads.items():
            logits = head(tokens).flatten(0, 1)
            y = targets[k].flatten()
            loss = loss + F.cross_entropy(logits, y)
            acc[k] = float((logits.argmax(-1) == y).float().mean())
        return loss, acc


def batch_size(grid: int, cell: int, tokens: int, lo: int = 2, hi: int = 64) -> int:
    """Boards per step for a visual-token budget ``tokens``."""
    per = grid * grid * (cell // 28) ** 2
    return int(np.clip(tokens // per, lo, hi))


def _batch(gen: BoardMaker, cfg: TrainConfig, rng: np.random.Generator) -> tuple[int, Boards, torch.Tensor]:
    g = int(rng.choice(sorted(set(cfg.grids) | {cfg.video_grid})))
    maker = gen.resized(g)
    boards = maker.boards(rng, batch_size(g, cfg.cell, cfg.s1_tokens), frame=None, marks=0.5)
    return g, boards, torch.from_numpy(maker.pixels(maker.render(boards, rng, strong=True)))


def _prefetch(make: Any, depth: int = 2) -> Any:
    """Iterator over ``make()`` results produced ahead in a background thread (numpy releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        while True:
            q.put(make())

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


def stage1(model: Any, cfg: TrainConfig, work: Path, gen: BoardMaker, test: BoardMaker, resume: bool) -> None:
    """Train the vision tower + merger with per-token auxiliary heads; checkpoints to work/stage1.safetensors."""
    visual = model.model.visual
    heads = AuxHeads(cfg.hidden, cfg.max_index)
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.s1_lr, weight_decay=0.01)
    objs = {"visual": visual, "heads": heads, "opt": opt}
    step = load_state(work / "stage1.safetensors", objs) if resume else 0
    rng = np.random.default_rng([cfg.seed, 1, step])
    visual.train()
    t0, hist = time.time(), []
    batches = _prefetch(lambda: _batch(gen, cfg, rng))
    with MatmulPatchEmbed(visual):
        while step < cfg.s1_steps:
            g, boards, pix = next(batches)
            tokens = vision_tokens(visual, pix, len(boards.frame), g * cfg.cell)
            targets = {k: torch.from_numpy(v) for k, v in gen.resized(g).token_targets(boards).items()}
            loss, acc = heads(tokens, targets)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.s1_steps, cfg.s1_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            hist.append([float(loss.detach()), acc["digit"], acc["frame"]])
            if step % cfg.log_every == 0 or step == cfg.s1_steps:
                m = np.mean(hist, 0)
                hist = []
                res = probe(visual, heads, cfg, test) if step % (cfg.log_every * 4) == 0 else {}
                log(f"stage1 step {step} loss {m[0]:.3f} digit-acc {m[1]:.3f} frame-acc {m[2]:.3f} test {res} "
                    f"{time.time() - t0:.0f}s")
            if step % cfg.ckpt_every == 0 or step == cfg.s1_steps:
                save_state(work / "stage1.safetensors", step, objs)
    visual.eval()


@torch.no_grad()
def probe(visual: nn.Module, heads: AuxHeads, cfg: TrainConfig, test: BoardMaker,
          grids: tuple[int, ...] = (4, 8), n_tokens: int = 2048) -> dict:
    """Per-token accuracy of each aux head on TEST-digit boards (task-like rendering), per grid size;
    frames drawn at random from all indices."""
    out = {}
    was = visual.training
    visual.eval()
    for g in grids:
        maker = test.resized(g)
        rng = np.random.default_rng([12345, g])
        boards = maker.boards(rng, batch_size(g, cfg.cell, n_tokens), frame=None, marks=0.5)
        pix = torch.from_numpy(maker.pixels(maker.render(boards, rng, strong=False)))
        with MatmulPatchEmbed(visual):
            tokens = vision_tokens(visual, pix, len(boards.frame), g * cfg.cell)
        _, acc = heads(tokens, {k: torch.from_numpy(v) for k, v in maker.token_targets(boards).items()})
        out[g] = {k: round(v, 3) for k, v in acc.items()}
    visual.train(was)
    return out
