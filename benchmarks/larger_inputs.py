"""The paper's larger-input experiment (Section 4.3, Figure 3) on the digits task: f_θ trained on labels of
SMALL inputs only, every method evaluated at each retention ratio on larger boards and longer videos, and
preservation (%) plotted against the number of visual tokens.

    explainprune label --model M --task digits --grid 4 --frames 4 --limit 800 --out runs/large/labels
    explainprune train --labels runs/large/labels --out runs/large/f --epochs 30
    .venv/bin/python benchmarks/larger_inputs.py --model M --compressor runs/large/f/compressor \
        --limit 100 --out runs/large/eval

Settings: still boards of ``--grids`` cells per side (kinds rowcol + colour) and videos of ``--frames``
frames (kind video, on the task's default 4 x 4 board). Each setting is one ``explainprune.evaluation``
run (vanilla once, then every method x ratio) written to OUT/<setting>/; OUT/summary.{json,md} hold
preservation per setting, method and ratio, and OUT/preservation_vs_size.png the plot (one panel per
modality and ratio). Methods that are not registered in this installation (e.g. ``layer0``) are skipped
with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_METHODS = ("vanilla", "oracle", "learned", "layer0", "fastv", "random")


def settings(grids: list[int], frames: list[int]) -> list[tuple[str, dict[str, Any], int]]:
    """(name, DigitsTask options, visual tokens per sample) of every setting (cell 56: 2 x 2 tokens/cell)."""
    out = [(f"grid{g}", {"grid": g, "kinds": ("rowcol", "colour")}, 4 * g * g) for g in grids]
    out += [(f"frames{f}", {"frames": f, "kinds": ("video",)}, 64 * f) for f in frames]
    return out


def summarise(rows: list[dict[str, Any]], ratios: list[float]) -> str:
    """Markdown: one row per (modality, method), one column per (setting, ratio) of preservation (%)."""
    lines = []
    for modality in ("image", "video"):
        sel = [r for r in rows if r["modality"] == modality]
        if not sel:
            continue
        names = list(dict.fromkeys(r["setting"] for r in sel))
        tokens = {r["setting"]: r["tokens"] for r in sel}
        head = [f"{n} ({tokens[n]} tok) {int(100 * q)}%" for n in names for q in ratios]
        lines += [f"| {modality} method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        acc = {r["setting"]: r["vanilla_accuracy"] for r in sel}
        lines.append("| vanilla accuracy | " + " | ".join(f"{100 * acc[n]:.1f}" for n in names for _ in ratios) + " |")
        for method in dict.fromkeys(r["method"] for r in sel):
            cells = []
            for n in names:
                for q in ratios:
                    hit = [r for r in sel if r["setting"] == n and r["method"] == method and r["ratio"] == q]
                    v = hit[0]["preservation"] if hit else None
                    cells.append("–" if v is None else f"{v:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], ratios: list[float], path: Path) -> Path:
    """Preservation (%) against visual tokens per sample: rows = modality, columns = retention ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = [m for m in ("image", "video") if any(r["modality"] == m for r in rows)]
    fig, axes = plt.subplots(len(modalities), len(ratios), figsize=(4 * len(ratios), 3.3 * len(modalities)),
                             dpi=110, squeeze=False)
    for i, modality in enumerate(modalities):
        for j, q in enumerate(ratios):
            ax = axes[i][j]
            sel = [r for r in rows if r["modality"] == modality and r["ratio"] == q and r["preservation"] is not None]
            for method in dict.fromkeys(r["method"] for r in sel):
                pts = sorted((r["tokens"], r["preservation"]) for r in sel if r["method"] == method)
                ax.plot(*zip(*pts), "o-", label=method)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{modality}, keep {int(100 * q)}%")
            ax.set_xlabel("visual tokens per sample")
            ax.set_ylabel("preservation (%)")
            ax.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' or a checkpoint directory")
    p.add_argument("--compressor", help="f_θ trained on small inputs only (given to 'learned')")
    p.add_argument("--grids", type=int, nargs="+", default=[4, 6, 8], help="board sizes (default 4 6 8)")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="video lengths (default 4 8 16)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--limit", type=int, default=100, help="test samples per setting (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/larger_inputs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    import torch

    from explainprune.evaluation.runner import EvalConfig, evaluate
    from explainprune.evaluation.tasks import TaskConfig
    from explainprune.models import load
    from explainprune.pruning import available

    torch.set_num_threads(a.threads)
    from explainprune.evaluation.runner import parse_method

    methods = [m for m in a.methods if parse_method(m)[0] in available()]  # specs too: learned:compressor=demo
    for m in sorted(set(a.methods) - set(methods)):
        print(f"note: method {m!r} is not registered here; skipped", file=sys.stderr)
    if "learned" in methods and not a.compressor:
        print("larger_inputs: error: 'learned' needs --compressor (f_θ trained on small-input labels)", file=sys.stderr)
        return 2
    options = {"learned": {"compressor": a.compressor}} if a.compressor else {}
    config = EvalConfig(methods=tuple(methods), ratios=tuple(a.ratios), method_options=options,
                        progress=not a.no_progress)
    out = Path(a.out)
    vlm = load(a.model)
    rows, t0 = [], time.time()
    for name, opts, tokens in settings(a.grids, a.frames):
        task = TaskConfig(name="digits", split="test", seed=a.seed, limit=a.limit, options=opts)
        report, _ = evaluate(a.model, task, config, out=str(out / name), plots=False, vlm=vlm)
        base = next(r.accuracy for r in report.results if r.method == "vanilla")
        for r in report.results:
            if r.method != "vanilla":
                rows.append({"setting": name, "modality": "video" if "frames" in opts else "image",
                             "tokens": tokens, "method": r.method, "ratio": r.ratio, "n": r.n,
                             "vanilla_accuracy": base, "accuracy": r.accuracy, "preservation": r.preservation})
        print(f"{name}: done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    table = summarise(rows, a.ratios)
    header = (f"model `{a.model}`, compressor `{a.compressor}`, {a.limit} test samples per setting, "
              f"{time.time() - t0:.0f} s; `benchmarks/larger_inputs.py {' '.join(argv or sys.argv[1:])}`\n\n")
    (out / "summary.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    plot(rows, a.ratios, out / "preservation_vs_size.png")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
