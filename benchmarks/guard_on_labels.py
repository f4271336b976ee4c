"""The training guard's numbers for given f_θ on given label sets, per (kind, N_v) group (issue 20).

A fast, model-free proxy of ``benchmarks/compressor_vs_input.py``: for every label directory (e.g. labels of
held-out questions, or of board sizes the compressor never saw) and every compressor, the guard's rank score
(``explainprune.guard``: R_v mass and region kept at the ratios) of f_θ beside its input's (the head-mean
A_v^0 ranking, what ``layer0`` keeps), per group of equal kind and number of visual tokens.

    .venv/bin/python benchmarks/guard_on_labels.py --compressor default=runs/f/compressor \\
        --labels runs/test_l_rowcol runs/test_s_rowcol --ratios 0.25 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compressor", nargs="+", required=True, metavar="NAME=DIR")
    p.add_argument("--labels", nargs="+", required=True, metavar="DIR")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    from explainprune.compressor import Compressor
    from explainprune.guard import group_guard
    from explainprune.labels import load_records

    compressors = {}
    for spec in args.compressor:
        name, _, path = spec.rpartition("=")
        compressors[name or Path(path).parent.name] = Compressor.from_pretrained(path).eval()
    keys = [f"region@{r:g}" for r in args.ratios] + [f"mass@{r:g}" for r in args.ratios] + ["rank_score"]
    print("| labels | group | n | ranking | " + " | ".join(keys) + " |")
    print("|---" * (4 + len(keys)) + "|")
    rows = []
    for d in args.labels:
        records = load_records(d)
        for name, f in compressors.items():
            for group, n, mine, theirs in group_guard(f, records, args.ratios):
                for who, m in (("input", theirs), (name, mine)):
                    if who == "input" and name != next(iter(compressors)):
                        continue
                    rows.append({"labels": d, "group": group, "n": n, "ranking": who, **m})
                    print(f"| {Path(d).name} | {group} | {n} | {who} | "
                          + " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
