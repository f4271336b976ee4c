"""Evaluation results as dataclasses: per-sample records, per (method, ratio) aggregates with 95% intervals,
and the Report with ``to_json`` / ``to_markdown`` / ``save`` (report.json, report.md). The plots live in
``evaluation.plots``, which reads a Report; this module never imports it."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from explainprune.files import write_text_atomic

VANILLA = "vanilla"
NA = "n/a"  # a method that does not apply to the samples of a cell (evs on images)


@dataclass
class SampleRecord:
    """One (sample, method, ratio) run. Times in seconds; FLOPs as exact integers (Appendix D)."""

    id: str
    kind: str
    method: str
    ratio: float
    question: str
    reference: str
    prediction: str
    correct: bool
    n_visual: int
    kept: int
    layer: int
    average_retention: float
    flops_llm: int
    flops_overhead: int
    prefill_s: float
    decode_s: float
    total_s: float
    new_tokens: int
    kv_bytes: int
    score_s: float = 0.0  # the pruner's score() on this prompt (run once, shared by the ratios)
    applicable: bool = True  # False: the method does not apply to this sample (evs on an image): "n/a"

    @property
    def flops(self) -> int:
        return self.flops_llm + self.flops_overhead


@dataclass
class MethodResult:
    """Aggregate of one (method, ratio) over the samples.

    accuracy: share of exact (normalised) matches; preservation: accuracy / vanilla accuracy * 100;
    avg_preservation: mean over kinds of the per-kind preservation (the paper's "Avg. (%)" with kinds as
    benchmarks); average_retention: mean over samples of the mean-over-layers kept share (Figure 3);
    flops: mean Eq. 4 (+ Eq. 5-6 overhead, + the method's own selection cost); times and KV-cache bytes
    are per-sample means; ``accuracy_ci`` / ``preservation_ci``: 95% intervals (``evaluation.stats``).
    """

    method: str
    ratio: float
    layer: int
    n: int
    accuracy: float
    accuracy_by_kind: dict[str, float]
    preservation: float | None
    avg_preservation: float | None
    average_retention: float
    effective_ratio: float
    flops: float
    flops_overhead: float
    prefill_s: float
    decode_s: float
    decode_per_token_s: float
    total_s: float
    kv_bytes: float
    score_s: float = 0.0
    accuracy_ci: list[float] | None = None      # 95% Wilson interval of the accuracy (0-1)
    preservation_ci: list[float] | None = None  # 95% paired bootstrap interval of the preservation (%)
    not_applicable: int = 0  # samples the method does not apply to (left out of every number above)
    not_applicable_kinds: list[str] = field(default_factory=list)  # kinds where it applies to no sample


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _ratio(a: float, b: float) -> float | None:
    return None if not b or math.isnan(b) else 100.0 * a / b


def aggregate(records: list[SampleRecord]) -> list[MethodResult]:
    """Group records by (method, ratio), in first-seen order; preservation against the ``vanilla`` rows."""
    groups: dict[tuple[str, float], list[SampleRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.ratio)].append(r)
    base = next((g for (m, _), g in groups.items() if m == VANILLA), [])
    full_acc = _mean([float(r.correct) for r in base])
    full_kind = _by_kind(base)
    base_by_id: dict[str, list[float]] = defaultdict(list)  # an id seen twice pairs by occurrence
    for r in base:
        base_by_id[r.id].append(float(r.correct))
    out = []
    for (method, ratio), every in groups.items():
        rows = [r for r in every if r.applicable]
        skipped = len(every) - len(rows)
        if skipped:  # n/a samples: numbers over the others, preservation against vanilla on the same samples
            ids = {r.id for r in rows}
            base_acc = _mean([float(r.correct) for r in base if r.id in ids])
            base_kind = _by_kind([r for r in base if r.id in ids])
        else:
            base_acc, base_kind = full_acc, full_kind
        if not rows:
            out.append(_not_applicable(method, ratio, every))
            continue
        acc = _mean([float(r.correct) for r in rows])
        kinds = _by_kind(rows)
        per_kind = [_ratio(kinds[k], base_kind[k]) for k in kinds if k in base_kind]
        per_kind = [p for p in per_kind if p is not None]
        new = sum(max(r.new_tokens - 1, 0) for r in rows)
        out.append(MethodResult(
            method=method, ratio=ratio, layer=rows[0].layer, n=len(rows), accuracy=acc, accuracy_by_kind=kinds,
            preservation=_ratio(acc, base_acc), avg_preservation=_mean(per_kind) if per_kind else None,
            average_retention=_mean([r.average_retention for r in rows]),
            effective_ratio=_mean([r.kept / r.n_visual for r in rows]),
            flops=_mean([float(r.flops) for r in rows]), flops_overhead=_mean([float(r.flops_overhead) for r in rows]),
            prefill_s=_mean([r.prefill_s for r in rows]), decode_s=_mean([r.decode_s for r in rows]),
            decode_per_token_s=sum(r.decode_s for r in rows) / new if new else float("nan"),
            total_s=_mean([r.total_s for r in rows]), kv_bytes=_mean([float(r.kv_bytes) for r in rows]),
            score_s=_mean([r.score_s for r in rows]), **_intervals(rows, base_by_id), not_applicable=skipped,
            not_applicable_kinds=sorted({r.kind for r in every} - set(kinds))))
    return out


def _not_applicable(method: str, ratio: float, rows: list[SampleRecord]) -> MethodResult:
    """A (method, ratio) that applies to none of the samples: every number NaN, shown as n/a."""
    nan = float("nan")
    return MethodResult(
        method=method, ratio=ratio, layer=rows[0].layer, n=0, accuracy=nan, accuracy_by_kind={}, preservation=None,
        avg_preservation=None, average_retention=nan, effective_ratio=nan, flops=nan, flops_overhead=nan,
        prefill_s=nan, decode_s=nan, decode_per_token_s=nan, total_s=nan, kv_bytes=nan, score_s=nan,
        not_applicable=len(rows), not_applicable_kinds=sorted({r.kind for r in rows}))


def _intervals(rows: list[SampleRecord], base_by_id: dict[str, list[float]]) -> dict[str, list[float] | None]:
    """95% intervals of one group: Wilson for the accuracy, paired bootstrap (pairs = same sample id, the
    vanilla answer) for the preservation."""
    from explainprune.evaluation.stats import paired_ratio_ci, wilson

    acc = wilson(sum(bool(r.correct) for r in rows), len(rows))
    seen: dict[str, int] = defaultdict(int)
    pairs = []
    for r in rows:
        if seen[r.id] < len(base_by_id.get(r.id, [])):
            pairs.append((float(r.correct), base_by_id[r.id][seen[r.id]]))
        seen[r.id] += 1
    pres = paired_ratio_ci(*zip(*pairs)) if len(pairs) == len(rows) and len(pairs) > 1 else None
    return {"accuracy_ci": list(acc) if acc else None, "preservation_ci": list(pres) if pres else None}


def _by_kind(rows: list[SampleRecord]) -> dict[str, float]:
    kinds: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        kinds[r.kind].append(float(r.correct))
    return {k: _mean(v) for k, v in sorted(kinds.items())}


def _clean(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _unit(x: float, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    for scale, unit in units:
        if x >= scale:
            return scale, unit
    return units[-1]


FLOPS_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, "1"))
BYTE_UNITS = ((2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1.0, "B"))


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


@dataclass
class Report:
    """Everything one ``explainprune eval`` measured: setup, aggregates and every per-sample answer."""

    model: str
    task: dict[str, Any]
    config: dict[str, Any]
    shape: dict[str, Any]
    environment: dict[str, Any]
    results: list[MethodResult]
    samples: list[SampleRecord] = field(repr=False, default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # samples whose media could not be read

    @classmethod
    def from_records(cls, records: list[SampleRecord], **meta: Any) -> Report:
        return cls(results=aggregate(records), samples=records, **meta)

    def result(self, method: str, ratio: float | None = None) -> MethodResult:
        for r in self.results:
            if r.method == method and (ratio is None or math.isclose(r.ratio, ratio)):
                return r
        raise KeyError(f"no result for {method!r} at ratio {ratio}; have "
                       f"{[(r.method, r.ratio) for r in self.results]}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (NaN written as null)."""
        return _clean({"model": self.model, "task": self.task, "config": self.config, "shape": self.shape,
                       "environment": self.environment, "results": [asdict(r) for r in self.results],
                       "samples": [asdict(s) for s in self.samples], "skipped": self.skipped})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(model=data["model"], task=data["task"], config=data["config"], shape=data["shape"],
                   environment=data["environment"], results=[MethodResult(**r) for r in data["results"]],
                   samples=[SampleRecord(**s) for s in data["samples"]], skipped=data.get("skipped", []))

    def accuracy_table(self) -> str:
        """Tables 1-3 shape: accuracy (%) per kind, overall, and Avg. (%) preservation."""
        kinds = sorted({k for r in self.results for k in r.accuracy_by_kind})
        head = ["Method", "Retention", *kinds, "Acc.", "Preservation (%)", "Avg. (%)", "Acc. 95% CI",
                "Preservation 95% CI"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.results:
            cells = [r.method, f"{100 * r.ratio:g}%"]
            cells += [_pct(100 * r.accuracy_by_kind[k]) if k in r.accuracy_by_kind else
                      NA if k in r.not_applicable_kinds else "–" for k in kinds]
            cells += [_pct(100 * r.accuracy), _pct(r.preservation), _pct(r.avg_preservation),
                      _interval(r.accuracy_ci, 100.0), _interval(r.preservation_ci, 1.0)]
            if not r.n:
                cells[-5:] = [NA] * 5
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def efficiency_table(self) -> str:
        """Tables 7-8 shape, plus measured times (scoring before the LLM, prefill, decode) and the KV cache."""
        scale, unit = _unit(max((r.flops for r in self.results), default=0.0), FLOPS_UNITS)
        bscale, bunit = _unit(max((r.kv_bytes for r in self.results), default=0.0), BYTE_UNITS)
        head = ["Method", "Retention", "Avg. retention over layers", f"FLOPs ({unit})", "Scoring (ms)",
                "Prefill (ms)", "Decode (ms/token)", f"KV cache ({bunit})", "Preservation (%)",
                "FLOPs (% of vanilla)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = next((r.flops for r in self.results if r.method == VANILLA), 0.0)
        for r in self.results:
            if r.not_applicable:  # % of vanilla on the same samples
                ids = self.applicable_ids(r)
                same = [float(s.flops) for s in self.samples if s.method == VANILLA and s.id in ids]
                r_base = _mean(same) if same else base
            else:
                r_base = base
            if not r.n:
                lines.append("| " + " | ".join([r.method, f"{100 * r.ratio:g}%"] + [NA] * (len(head) - 2)) + " |")
                continue
            cells = [r.method, f"{100 * r.ratio:g}%", f"{100 * r.average_retention:.1f}%",
                     f"{r.flops / scale:.3f}", f"{1e3 * r.score_s:.1f}", f"{1e3 * r.prefill_s:.1f}",
                     _pct(1e3 * r.decode_per_token_s, 2),
                     f"{r.kv_bytes / bscale:.1f}", _pct(r.preservation), _pct(_ratio(r.flops, r_base))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        n = max((r.n for r in self.results), default=0)
        task = ", ".join(f"{k}={v}" for k, v in self.task.items())
        skipped = "".join(f"- skipped: line {e.get('line')}, sample {e.get('id')}: {e.get('error')}\n"
                          for e in self.skipped)
        skipped = f"{len(self.skipped)} samples skipped (unreadable media):\n\n{skipped}\n" if skipped else ""
        skipped += "".join(f"{r.method} at {100 * r.ratio:g}%: n/a on {r.not_applicable} of "
                           f"{r.n + r.not_applicable} samples (the method does not apply to them); its numbers are "
                           "over the others, its preservation against vanilla on the same samples.  \n"
                           for r in self.results if r.not_applicable)
        skipped += "\n" if any(r.not_applicable for r in self.results) else ""
        return (f"# explainprune evaluation\n\nmodel: `{self.model}`  \ntask: {task}  \nsamples: {n}\n\n{skipped}"
                f"## Accuracy\n\n{self.accuracy_table()}\n\n## Efficiency\n\n{self.efficiency_table()}\n\n"
                "FLOPs: Appendix D, Eq. 4 per layer with that layer's visual tokens (+ Eq. 5-6 for the "
                "compressor, + each method's own selection cost); times are per-sample means measured on this "
                f"machine.\n\n## Preservation at matched FLOPs\n\n{self.matched_cost_table()}\n\n"
                "Each column is a FLOPs budget: the cost of keeping that share of the visual tokens before the "
                "LLM (mean over the samples the method ran on). A cell is the best preservation (%) the method "
                "reaches at a cost within the budget (+2%), with the setting (nominal ratio) that reaches it; a "
                "setting's cost is its FLOPs as run (in-LLM methods: every layer with the visual tokens it kept, "
                "so their nominal ratio lands in a larger budget), selection cost included; – when none of its "
                "settings is that cheap; the best of each column is bold. "
                "Intervals: 95% (Wilson for accuracy, paired bootstrap over samples for preservation).\n")

    def applicable_ids(self, r: MethodResult) -> set[str]:
        """Ids of the samples the (method, ratio) of ``r`` applies to (every sample unless some were n/a)."""
        return {s.id for s in self.samples if s.method == r.method and s.ratio == r.ratio and s.applicable}

    def budgets(self, ids: set[str] | None = None) -> list[tuple[float, float]]:
        """(ratio, FLOPs) budgets: Eq. 4 of keeping ``ratio`` of the visual tokens before the LLM, mean over
        the samples (those in ``ids`` if given: a method's own, when it is n/a on some), for every ratio
        evaluated (from the per-sample records' token counts)."""
        shape = self._shape()
        if shape is None:
            return []
        ns = [s.n_visual for s in self.samples if s.method == VANILLA and (ids is None or s.id in ids)] or \
            [s.n_visual for s in self.samples if ids is None or s.id in ids]
        return [(q, _budget(ns, q, shape)) for q in self._budget_ratios()]

    def _shape(self) -> Any:
        from explainprune.cost import LLMShape

        if not self.samples or not {"hidden", "intermediate", "layers"} <= set(self.shape):
            return None
        return LLMShape(**self.shape)

    def _budget_ratios(self) -> list[float]:
        return sorted({r.ratio for r in self.results if r.method != VANILLA}, reverse=True)

    def matched_cost_table(self, slack: float = 0.02) -> str:
        """Best preservation per method within each FLOPs budget (see ``to_markdown``). A setting's cost is
        its mean FLOPs as run (in-LLM methods: every layer with the visual tokens it kept, plus each method's
        selection cost); the budget is taken over the SAME samples (a method that ran on part of them is
        compared on that part). Each cell names the setting (nominal ratio) that reaches it."""
        shape = self._shape()
        if shape is None:
            return "(no per-sample records: no budgets)"
        ratios = self._budget_ratios()
        methods = [m for m in dict.fromkeys(r.method for r in self.results) if m != VANILLA]
        best: dict[tuple[str, float], tuple[float, float]] = {}
        for r in self.results:
            if r.method == VANILLA or r.preservation is None:
                continue
            ns = [s.n_visual for s in self.samples if s.method == r.method and s.ratio == r.ratio and s.applicable]
            for q in ratios:
                within = bool(ns) and r.flops <= _budget(ns, q, shape) * (1 + slack)
                if within and ((r.method, q) not in best or best[(r.method, q)][0] < r.preservation):
                    best[(r.method, q)] = (r.preservation, r.ratio)
        head = ["Method", *[f"≤ cost of {100 * q:g}% before the LLM" for q in ratios]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        top = {q: max((v for (m, qq), (v, _) in best.items() if qq == q), default=None) for q in ratios}
        for m in methods:
            cells = [m]
            for q in ratios:
                if (m, q) not in best:
                    cells.append("–")
                    continue
                v, at = best[(m, q)]
                cells.append((f"**{v:.1f}**" if v == top[q] else f"{v:.1f}") + f" ({100 * at:g}%)")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write report.json and report.md; returns the paths (plots: ``evaluation.plots.save_plots``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / "report.json", "markdown": d / "report.md"}
        write_text_atomic(paths["json"], json.dumps(self.to_json(), indent=1, allow_nan=False))
        write_text_atomic(paths["markdown"], self.to_markdown())
        return paths


def _budget(ns: list[int], q: float, shape: Any) -> float:
    """Eq. 4 of keeping ``q`` of each sample's visual tokens before the LLM, mean over the samples."""
    from explainprune.cost import kept_count, llm_flops

    return _mean([float(llm_flops([kept_count(n, q)] * shape.layers, shape)) for n in ns])


def _interval(ci: list[float] | None, scale: float) -> str:
    return "–" if not ci else f"[{scale * ci[0]:.1f}, {scale * ci[1]:.1f}]"
