"""Stage 2 of the digits recipe: question answering by the language model on frozen visual tokens.

Every step draws, for each question kind, a size uniformly (a grid from ``cfg.grids`` for still images, a
video length from ``cfg.frames``) and a batch sized by a visual-token budget (``cfg.s2_tokens``), and
trains on the answer loss + ``cfg.s2_attn`` x the auxiliary attention term (``questions.aux_attention_loss``)
+ ``cfg.s2_ground`` x the layer-0 grounding term (``ground.ground_loss``). Vision frozen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.digits import ground
from recipes.digits import questions as dq
from recipes.digits.common import TrainConfig, llm_param_groups, load_state, log, lr_at, save_state
from recipes.digits.data import BoardMaker

PROBE_FRAMES = (2, 4, 8, 12, 16)


def bank_cache(visual: Any, cfg: TrainConfig, work: Path, maker: BoardMaker, split: str) -> dq.Banks:
    """Stage 2's banks (computed once, kept in work/banks_{split}.safetensors)."""
    path = work / f"banks_{split}.safetensors"
    if path.is_file():
        return dq.Banks.load(path)
    train = split == "train"
    banks = dq.make_banks(visual, maker, cfg.grids, cfg.video_grid, max(cfg.frames),
                          cfg.bank_images if train else 96, cfg.bank_frames if train else 48,
                          cfg.seed + (0 if train else 1), strong=train)
    banks.save(path)
    return banks


class LLMState:
    """state_dict / load_state_dict of everything but the vision tower."""

    def __init__(self, model: Any):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("model.visual")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("model.visual") for k in missing):
            raise ValueError(f"stage-2 checkpoint does not match the model: {unexpected or missing}")


def draw_step(kind: str, banks: dq.Banks, cfg: TrainConfig, rng: np.random.Generator) -> tuple:
    """One kind's questions for a step: a random size and a batch sized by the token budget."""
    sizes = dq.sizes_of(kind, banks, cfg.frames)
    size = int(sizes[rng.integers(len(sizes))])
    n = int(np.clip(cfg.s2_tokens // dq.tokens_per_question(kind, banks, size), 2, cfg.s2_max_batch))
    return size, dq.draw_questions(kind, banks, n, rng, size)


def stage2(model: Any, tok: Any, cfg: TrainConfig, work: Path, gen: BoardMaker, test: BoardMaker,
           resume: bool) -> None:
    """Train the language model (embeddings, decoder, head); checkpoints to work/stage2.safetensors."""
    visual = model.model.visual.eval().requires_grad_(False)
    t0 = time.time()
    train_banks = bank_cache(visual, cfg, work, gen, "train")
    test_banks = bank_cache(visual, cfg, work, test, "test")
    log(f"stage2 banks ready in {time.time() - t0:.0f}s")
    params, groups = llm_param_groups(model, cfg.s2_lr, cfg.s2_qk_lr)
    opt = torch.optim.AdamW(groups, lr=cfg.s2_lr, weight_decay=0.01)
    objs = {"llm": LLMState(model), "opt": opt}
    step = load_state(work / "stage2.safetensors", objs) if resume else 0
    rng = np.random.default_rng([cfg.seed, 2, step])
    train_steps(model, tok, opt, params, objs, work / "stage2.safetensors", step, cfg.s2_steps, cfg.s2_warmup,
                list(cfg.kinds), train_banks, test_banks, cfg, rng, "stage2", cfg.log_every * 4, cfg.ckpt_every,
                t0, attn_weight=cfg.s2_attn, ground_weight=cfg.s2_ground)
    model.eval()


def train_steps(model: Any, tok: Any, opt: torch.optim.Optimizer, params: list[Any], objs: dict[str, Any],
                ckpt: Path, step: int, steps: int, warmup: int, kinds: list[str], train_banks: dq.Banks,
                test_banks: dq.Banks, cfg: TrainConfig, rng: np.random.Generator, name: str, probe_every: int,
                ckpt_every: int, t0: float, **step_kwargs: Any) -> None:
    """The language model's training loop from ``step`` to ``steps`` (stage 2 and the fine-tunes after it):
    warmup + cosine schedule on each group's peak; per step, one batch per entry of ``kinds`` (a kind listed
    twice gets two batches) at a random size (``draw_step``) through ``ground.step_kind(**step_kwargs)``;
    train accuracy (and count loss) logged every ``cfg.log_every`` steps, the teacher-forced probe on
    ``test_banks`` every ``probe_every``, checkpoints (weights + AdamW state) to ``ckpt`` every ``ckpt_every``."""
    probe_kinds = tuple(dict.fromkeys(kinds))
    hist: dict[str, list[float]] = {}
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["peak"], warmup=warmup)
        opt.zero_grad(set_to_none=True)
        model.train()
        for kind in kinds:
            size, drawn = draw_step(kind, train_banks, cfg, rng)
            r = ground.step_kind(model, tok, kind, drawn, scale=1.0 / len(kinds), **step_kwargs)
            for k in ("acc", "count"):
                if k in r:
                    hist.setdefault(f"{kind}.{k}", []).append(r[k])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == steps:
            summary = {k: round(float(np.mean(v)), 3) for k, v in hist.items()}
            hist = {}
            res = {}
            if step % probe_every == 0 or step == steps:
                model.eval()
                res = dq.evaluate(model, tok, test_banks, probe_kinds, PROBE_FRAMES, n=32)
            log(f"{name} step {step} train {summary} test {res} {time.time() - t0:.0f}s")
        if step % ckpt_every == 0 or step == steps:
            save_state(ckpt, step, objs)
