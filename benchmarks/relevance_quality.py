"""Relevance quality on real answers: how much of each score lies in the digits task's ground-truth region.

    .venv/bin/python benchmarks/relevance_quality.py --n 200            # the table in docs/relevance_quality.md
    .venv/bin/python benchmarks/relevance_quality.py --model runs/exp2/out --n 40 --json

For each test sample the model answers greedily; samples it answers correctly are scored by R_v (Eq. 1,
explaining that answer), A_v^0 (first-layer attention, mean over heads: the compressor's input), FastV's
layer-K score (last prompt token's attention at layer K-1, mean over heads) and seeded random scores.
Metrics (``explainprune.evaluation.localization``): region mass (share of max(score, 0) inside the
region), pointing-game hit rate and rank AUC, per question kind and overall, with the chance levels
(|region| / N_v for the first two, 0.5 for the AUC).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' (the shipped model) or a checkpoint directory")
    p.add_argument("--n", type=int, default=200, help="samples of the split (kinds cycle, so ~n/3 per kind)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0, help="task seed (the random scores use it too)")
    p.add_argument("--kinds", nargs="+", default=None, help="question kinds (default: the task's default set)")
    p.add_argument("--grid", type=int, help="board cells per side (default: the task's, 4)")
    p.add_argument("--frames", type=int, help="video frames (default: the task's, 4)")
    p.add_argument("--fastv-layers", type=int, nargs="+", default=[1, 2], metavar="K",
                   help="FastV layers K (scores at layer K-1); each must be in 1..L-1")
    p.add_argument("--per-head", action="store_true", help="also score each head of A_v^0 on its own")
    p.add_argument("--all-answers", action="store_true", help="also score wrongly answered samples")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of markdown")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    import explainprune
    from explainprune.evaluation.localization import default_scorers, head_scorers, measure
    from explainprune.labels import DigitsSource

    start = time.perf_counter()
    vlm = explainprune.load(a.model)
    layers = len(vlm.language_model.layers)
    bad = [k for k in a.fastv_layers if not 1 <= k < layers]
    if bad:
        p.error(f"--fastv-layers {bad}: K must be in 1..{layers - 1} for this {layers}-layer model")
    options = {"kinds": a.kinds} if a.kinds else {}
    options.update({k: getattr(a, k) for k in ("grid", "frames") if getattr(a, k) is not None})
    source = DigitsSource(split=a.split, seed=a.seed, n=a.n, **options)
    scorers = default_scorers(a.fastv_layers, seed=a.seed)
    if a.per_head:
        scorers.update(head_scorers(vlm.text_config.num_attention_heads))
    report = measure(vlm, source, scorers,
                     only_correct=not a.all_answers, progress=not a.no_progress)
    command = "benchmarks/relevance_quality.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    report.info.update(model=a.model, split=a.split, n=a.n, seed=a.seed, layers=layers,
                       command=command.strip(), wall_seconds=round(time.perf_counter() - start, 1))
    if a.json:
        print(json.dumps(report.to_json(), indent=1))
        return
    i = report.info
    size = "".join(f", {k} {v}" for k, v in options.items() if k != "kinds")
    print(f"model `{a.model}` ({layers} LLM layers), digits {a.split} split{size}, first {a.n} samples "
          f"(seed {a.seed}); {i['wall_seconds']} s wall, one thread. Scores clipped at 0 before normalising.\n")
    print(report.to_markdown())


if __name__ == "__main__":
    main()
