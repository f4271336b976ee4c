"""How well could a checkpoint count if counting itself were perfect? Its own recognition bounds it.

For each count question of the test split (``DigitsTask(kinds=("count",))``), ask the model the digit of
every filled cell of the same board with ``rowcol`` questions and count the cells whose answer is the asked
digit. The accuracy of that count is what a flawless counter reading this model's per-cell recognition
would get; the model's own count answers are measured beside it:

    python -m recipes.digits.count_bound --model demo --n 100 --grids 3 4 5 6 7 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from explainprune.tasks.digits import DigitsTask


def bound(vlm: object, grid: int, n: int, seed: int = 0, batch: int = 16) -> dict[str, float]:
    """(model's count accuracy, count accuracy from its per-cell rowcol answers, per-cell rowcol accuracy)
    over the first ``n`` count samples at ``grid``."""
    task = DigitsTask("test", seed=seed, n=n, grid=grid, kinds=("count",))
    own, derived, cells = [], [], []
    for i in range(n):
        s = task.sample(i)
        digit = int(s.question.split()[2])  # "how many 7 are there ?"
        board = np.asarray(s.digits[0])
        filled = [(int(r), int(c)) for r, c in np.argwhere(board >= 0)]
        prompts = [vlm.prepare(question=f"what digit is in row {r + 1} , column {c + 1} ?", **s.media())
                   for r, c in filled]
        answers = []
        for k in range(0, len(prompts), batch):
            answers += [o.text.strip() for o in vlm.generate(prompts[k:k + batch], max_new_tokens=4)]
        cells += [a == str(board[r, c]) for a, (r, c) in zip(answers, filled, strict=True)]
        derived.append(sum(a == str(digit) for a in answers) == int(s.answer))
        out = vlm.generate(vlm.prepare(question=s.question, **s.media()), max_new_tokens=4)
        own.append(out.text.strip() == s.answer)
    return {"count": float(np.mean(own)), "count_from_cells": float(np.mean(derived)),
            "cell": float(np.mean(cells)), "n": n, "cells": len(cells)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="'demo' (the shipped model) or a checkpoint directory")
    p.add_argument("--n", type=int, default=60, help="count questions per grid")
    p.add_argument("--grids", type=int, nargs="+", default=[3, 4, 6, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)
    import torch

    import explainprune

    torch.set_num_threads(a.threads)
    vlm = explainprune.load(a.model)
    t0 = time.time()
    res = {}
    print("| grid | model's count answers | count from its per-cell answers | per-cell digit | n |")
    print("|---|---|---|---|---|")
    for g in a.grids:
        r = res[str(g)] = bound(vlm, g, a.n, a.seed)
        print(f"| {g}x{g} | {r['count']:.3f} | {r['count_from_cells']:.3f} | {r['cell']:.3f} ({r['cells']} cells) "
              f"| {r['n']} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": res, "seconds": round(time.time() - t0)},
                                          indent=1))


if __name__ == "__main__":
    main()
