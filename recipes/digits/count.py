"""Count fine-tune of the digits demo model (stage 3): teach the language model to turn the cells holding a
digit into a number, keeping every other kind.

Stage 2 supervises the answer query's attention on count questions with the region MASS only
(``questions.aux_attention_loss``), which a head meets by attending to any one of the cells, and counting
stayed at the level of the majority answer (docs/digits.md, "What did not work"). Here four heads
(``questions.COUNT_HEADS``) are trained to attend uniformly to every token of the asked digit's cells plus
a fixed weight on ``<|vision_start|>`` (``questions.count_ratio_loss``), so their output carries
w / (4 k + w), a number the later layers can read. Every step still trains all kinds at every size (as
stage 2: a size per kind, batches by a token budget), with ``--count-batches`` count batches.

    python -m recipes.digits.count --init src/explainprune/assets/demo --work runs/digits13 \\
        --out runs/count/out --steps 600 [--resume]

``--work`` holds stage 2's banks (``banks_{train,test}.safetensors``, computed by ``recipes.digits.train``)
and receives this stage's checkpoint ``count.safetensors`` (weights + AdamW state, no pickles) every
``--ckpt-every`` steps; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from recipes.digits import ground
from recipes.digits.common import TrainConfig, llm_param_groups, load_state, log
from recipes.digits.stage2 import LLMState, train_steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="src/explainprune/assets/demo", help="checkpoint to fine-tune")
    p.add_argument("--work", default="runs/digits13", help="dir with stage 2's banks; gets count.safetensors")
    p.add_argument("--out", default="runs/count/out", help="the fine-tuned checkpoint directory")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--count-weight", type=float, default=1.0, help="weight of questions.count_ratio_loss")
    p.add_argument("--count-target", choices=["tokens", "cells"], default="tokens",
                   help="the count heads attend to every region token, or to each cell's last token only")
    p.add_argument("--count-batches", type=int, default=2, help="count batches per step (other kinds: 1)")
    p.add_argument("--kinds", nargs="+", default=["rowcol", "colour", "count", "video"])
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from --work/count.safetensors")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.work)
    model, tok, train, test = ground.load_for_finetune(a.init, work)
    cfg = TrainConfig(log_every=a.log_every)  # stage 2's sizes and token budget
    params, groups = llm_param_groups(model, a.lr, None)
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.01)
    objs = {"llm": LLMState(model), "opt": opt}
    ckpt = work / "count.safetensors"
    step = load_state(ckpt, objs) if a.resume else 0
    rng = np.random.default_rng([a.seed, 3, step])
    kinds = [k for k in a.kinds for _ in range(a.count_batches if k == "count" else 1)]
    train_steps(model, tok, opt, params, objs, ckpt, step, a.steps, a.warmup, kinds, train, test, cfg, rng, "count",
                a.probe_every, a.ckpt_every, t0, attn_weight=cfg.s2_attn, ground_weight=1.0,
                count_weight=a.count_weight, count_cells=a.count_target == "cells")
    model.eval()
    out = ground.export_finetuned(model, a.init, Path(a.out))
    log(f"saved {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
