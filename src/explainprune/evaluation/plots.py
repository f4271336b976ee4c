"""Trade-off plots of a Report (Figure 3 style): preservation vs average retention over layers, and
preservation vs FLOPs (with the matched-cost budgets as dotted lines, so the method that wins at equal FLOPs
is the highest point left of a line); one line per method, vanilla as a star. matplotlib is imported only
here, lazily. This module reads a Report; ``report.py`` never imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from explainprune.evaluation.report import VANILLA, Report
from explainprune.files import atomic_path

AXES = {
    "retention": ("average_retention", 100.0, "average retention ratio over LLM layers (%)"),
    "flops": ("flops", 1.0, "FLOPs of the LLM's visual part + overhead"),
}


def series(report: Report, x: str) -> dict[str, list[tuple[float, float]]]:
    """method -> [(x, preservation %)] sorted by x; ``x`` is "retention" or "flops"."""
    attr, scale, _ = AXES[x]
    out: dict[str, list[tuple[float, float]]] = {}
    for r in report.results:
        if r.preservation is None:
            continue
        out.setdefault(r.method, []).append((scale * getattr(r, attr), r.preservation))
    return {m: sorted(pts) for m, pts in out.items()}


def plot_tradeoff(report: Report, x: str, path: str | Path) -> Path:
    """One PNG: preservation (%) against ``x`` ("retention" or "flops")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, label = AXES[x]
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for method, pts in series(report, x).items():
        xs, ys = zip(*pts)
        if method == VANILLA:
            ax.plot(xs, ys, "k*", markersize=12, label=method)
        else:
            ax.plot(xs, ys, "o-", label=method)
    if x == "flops":
        ax.set_xscale("log")
        for q, cost in report.budgets():
            ax.axvline(cost, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{100 * q:g}%", (cost, ax.get_ylim()[0]), fontsize=7, color="grey")
    ax.set_xlabel(label)
    ax.set_ylabel("performance preservation (%)")
    ax.set_title(f"{Path(report.model).name}: {report.task.get('task', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_tradeoffs(report: Report, directory: str | Path) -> dict[str, Any]:
    """Both plots into ``directory``: preservation_vs_retention.png and preservation_vs_flops.png."""
    d = Path(directory)
    return {f"plot_{x}": plot_tradeoff(report, x, d / f"preservation_vs_{x}.png") for x in AXES}


def save_plots(report: Report, directory: str | Path) -> dict[str, Any]:
    """``plot_tradeoffs``, or nothing (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no plots (pip install 'explainprune[plot]')", stacklevel=2)
        return {}
    return plot_tradeoffs(report, directory)
