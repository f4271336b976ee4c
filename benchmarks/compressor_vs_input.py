"""Does the learned compressor f_θ beat its own input? (issue 20)

On held-out digits (test split, a seed no test uses), every question is answered greedily with the visual
tokens kept by (a) ranking the head-mean A_v^0 (the ``layer0`` pruner, f_θ's input used directly) and (b) each
given f_θ, at each ratio; the same questions for every method, so the comparison is paired: an exact McNemar
test on the discordant questions (f_θ right / input wrong vs the reverse).

    .venv/bin/python benchmarks/compressor_vs_input.py --compressor default=runs/f/compressor \\
        paper=runs/f_paper/compressor --per-kind 300 --out runs/cvi

Settings: ``small`` = 4 x 4 boards (kinds rowcol, colour) + 4-frame videos (kind video), the task's
defaults; ``large`` = 8 x 8 boards (rowcol, colour) + 16-frame videos (video). A_v^0 is computed once per
question and shared; a generation is cached by its kept set, so methods that keep the same tokens share it.
OUT/records.jsonl holds one line per (setting, kind, question) and is resumed; OUT/summary.{md,json} hold
accuracy per method, vanilla (all tokens) for reference, and the paired test against the input ranking.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = {
    "small": [("rowcol", {"grid": 4}), ("colour", {"grid": 4}), ("video", {"frames": 4})],
    "large": [("rowcol", {"grid": 8}), ("colour", {"grid": 8}), ("video", {"frames": 16})],
}
INPUT = "layer0"


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c discordant counts; 2 · P(X <= min(b, c)), X ~ Bin(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def question_records(vlm: Any, sample: Any, compressors: dict[str, Any], ratios: list[float],
                     max_new_tokens: int, known: dict[str, int] | None = None) -> dict[str, Any]:
    """Correctness (0/1) of vanilla and of every method at every ratio for one question. ``known``: earlier
    generations of this question by kept set (``gen``: digest of the kept indices -> 0/1), reused."""
    import hashlib

    import torch

    from explainprune.answers import is_correct
    from explainprune.attention import first_layer_attention
    from explainprune.pruning.base import select

    prompt = vlm.prepare(images=sample.images, video=sample.video, question=sample.question)
    with torch.no_grad():
        a = first_layer_attention(vlm, prompt)
        scores = {INPUT: a.mean(0), **{name: f(a) for name, f in compressors.items()}}
    cache: dict[str, int] = dict(known or {})

    def correct(keep: Any) -> int:
        key = "all" if keep is None else hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:16]
        if key not in cache:
            out = vlm.generate(prompt, keep=keep, max_new_tokens=max_new_tokens)
            cache[key] = int(is_correct(out.text, sample.answer))
        return cache[key]

    rec: dict[str, Any] = {"vanilla": correct(None), "n_visual": prompt.num_visual, "gen": cache}
    for ratio in ratios:
        for name, s in scores.items():
            rec[f"{name}@{ratio:g}"] = correct(select(s, ratio))
    return rec


def summarise(rows: list[dict[str, Any]], methods: list[str], ratios: list[float]) -> tuple[str, list[dict]]:
    """Markdown table + JSON rows: per setting (kinds pooled) and ratio, accuracy of each method and the
    paired test of each f_θ against the input ranking."""
    out, lines = [], ["| setting | kept | questions | vanilla | head-mean A_v^0 | " + " | ".join(
        f"{m} | {m} vs input (b / c, McNemar p)" for m in methods) + " |",
        "|---" * (5 + 2 * len(methods)) + "|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sel = [r for r in rows if r["setting"] == setting]
        kinds = "+".join(dict.fromkeys(r["kind"] for r in sel))
        for ratio in ratios:
            base = [r[f"{INPUT}@{ratio:g}"] for r in sel]
            row = {"setting": setting, "kinds": kinds, "ratio": ratio, "n": len(sel),
                   "vanilla": sum(r["vanilla"] for r in sel) / len(sel), "input": sum(base) / len(sel)}
            cells = []
            for m in methods:
                mine = [r[f"{m}@{ratio:g}"] for r in sel]
                b = sum(1 for x, y in zip(mine, base, strict=True) if x and not y)
                c = sum(1 for x, y in zip(mine, base, strict=True) if y and not x)
                row[m] = {"accuracy": sum(mine) / len(sel), "f_right_input_wrong": b, "input_right_f_wrong": c,
                          "mcnemar_p": mcnemar(b, c)}
                cells += [f"{100 * row[m]['accuracy']:.1f}", f"{b} / {c}, p = {mcnemar(b, c):.3g}"]
            out.append(row)
            lines.append(f"| {setting} ({kinds}) | {100 * ratio:g}% | {len(sel)} | {100 * row['vanilla']:.1f} | "
                         f"{100 * row['input']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def write_summary(out: Path, rows: list[dict], compressors: list[str], args: argparse.Namespace) -> int:
    """summary.md / summary.json of the paired table over ``rows``, printed too."""
    table, summary = summarise(rows, compressors, args.ratios)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"seed": args.seed, "per_kind": args.per_kind, "rows": summary},
                                                 indent=1))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--compressor", nargs="+", required=True, metavar="NAME=DIR",
                   help="f_θ directories to compare with the input ranking (NAME=DIR, or DIR: named by its folder)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--kinds", nargs="+", choices=["rowcol", "colour", "video"],
                   help="only these kinds (default all; e.g. to split the work over processes, then summarise "
                        "their records together)")
    p.add_argument("--per-kind", type=int, default=300, help="questions per kind and setting (default 300)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    p.add_argument("--seed", type=int, default=2020, help="digits test seed (default 2020: no test uses it)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--records", nargs="*", default=[], metavar="FILE",
                   help="further records.jsonl files to read (e.g. of processes that ran other kinds)")
    p.add_argument("--summarise-only", action="store_true",
                   help="run no model: summarise the questions whose records hold every method (a partial run "
                        "reports fewer questions)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    import explainprune
    from explainprune.compressor import Compressor
    from explainprune.labels import DigitsSource

    torch.set_num_threads(args.threads)
    compressors = {}
    for spec in args.compressor:
        name, _, path = spec.rpartition("=")
        path_obj = Path(path)
        compressors[name or path_obj.parent.name] = Compressor.from_pretrained(path_obj).eval()
    vlm = explainprune.load(args.model)
    for f in compressors.values():
        f.check_compatible(vlm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    done = {}
    for path in [records_path, *map(Path, args.records)]:
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                key = (r["setting"], r["kind"], r["index"])
                done[key] = {**done.get(key, {}), **r}
    needed = [f"{m}@{q:g}" for m in [INPUT, *compressors] for q in args.ratios]
    if args.summarise_only:
        rows = [r for (setting, kind, i), r in sorted(done.items()) if setting in args.settings and i < args.per_kind
                and (not args.kinds or kind in args.kinds) and all(k in r for k in needed)]
        return write_summary(out, rows, list(compressors), args)
    rows, t0 = [], time.perf_counter()
    for setting in args.settings:
        for kind, options in SETTINGS[setting]:
            if args.kinds and kind not in args.kinds:
                continue
            source = DigitsSource(split="test", seed=args.seed, n=args.per_kind, kinds=(kind,), **options)
            for i in range(len(source)):
                r = done.get((setting, kind, i))
                if r is None or any(k not in r for k in needed):
                    rec = question_records(vlm, source[i], compressors, args.ratios, args.max_new_tokens,
                                           (r or {}).get("gen"))
                    r = {"setting": setting, "kind": kind, "index": i, **(r or {}), **rec}
                    with records_path.open("a") as fh:
                        fh.write(json.dumps(r) + "\n")
                rows.append(r)
            print(f"{setting} {kind}: {args.per_kind} questions ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    return write_summary(out, rows, list(compressors), args)


if __name__ == "__main__":
    sys.exit(main())
