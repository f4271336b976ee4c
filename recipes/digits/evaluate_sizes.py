"""Accuracy of a digits checkpoint per size and question kind, through the ordinary ``Qwen2VL`` adapter
(greedy answers, exact match), on the test split:

    python -m recipes.digits.evaluate_sizes --model runs/digits13/out --n 100 --out runs/digits13/sizes.json

Still boards of every ``--grids`` size are asked ``rowcol``, ``colour`` and ``count`` questions; videos of
every ``--frames`` length (on the default 4 x 4 board) ``video`` questions. ``--n`` questions per cell of
the table (samples 0..n-1 of a one-kind task, so every cell has exactly n).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from explainprune.tasks.digits import DigitsTask, accuracy


def table(results: dict[str, dict[str, float]], grids: list[int], frames: list[int], kinds: list[str]) -> str:
    """Markdown: a row per image kind over the grids, and a video row over the frame counts."""
    lines = ["| kind | " + " | ".join(f"{g}x{g}" for g in grids) + " |", "|---" * (len(grids) + 1) + "|"]
    for kind in (k for k in kinds if k != "video"):
        cells = [f"{results[kind].get(str(g), float('nan')):.3f}" for g in grids]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if "video" in kinds:
        lines += ["", "| kind | " + " | ".join(f"{f} frames" for f in frames) + " |", "|---" * (len(frames) + 1) + "|",
                  "| video | " + " | ".join(f"{results['video'].get(str(f), float('nan')):.3f}" for f in frames) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="'demo' (the shipped model) or a checkpoint directory")
    p.add_argument("--n", type=int, default=100, help="questions per size and kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grids", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    p.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--kinds", nargs="+", default=["rowcol", "colour", "count", "video"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)
    import torch

    import explainprune

    torch.set_num_threads(a.threads)
    vlm = explainprune.load(a.model)
    results: dict[str, dict[str, float]] = {}
    t0 = time.time()
    for kind in a.kinds:
        for size in a.frames if kind == "video" else a.grids:
            opts = {"frames": size} if kind == "video" else {"grid": size}
            task = DigitsTask("test", seed=a.seed, n=a.n, kinds=(kind,), **opts)
            results.setdefault(kind, {})[str(size)] = accuracy(vlm, task)["per_kind"][kind]
            print(f"{kind} {size}: {results[kind][str(size)]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    md = table(results, a.grids, a.frames, a.kinds)
    print(md)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results, "seconds": round(time.time() - t0),
                                           "markdown": md}, indent=1))


if __name__ == "__main__":
    main()
