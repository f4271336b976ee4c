"""The per-run efficiency summary written next to lmms-eval's results: per task, the aggregates
``explainprune eval`` reports (``evaluation.report.aggregate``: kept tokens, average retention over layers,
FLOPs, prefill / decode time, KV-cache bytes), without accuracy (lmms-eval scores the answers)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

FIELDS = ("n", "layer", "average_retention", "effective_ratio", "flops", "flops_overhead", "prefill_s",
          "decode_s", "decode_per_token_s", "total_s", "kv_bytes", "score_s")


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _group(records: list[Any]) -> dict[str, Any]:
    from explainprune.evaluation.report import aggregate

    (result,) = aggregate(records)  # one method and ratio per run
    row = {k: _finite(getattr(result, k)) for k in FIELDS}
    row["n_visual"] = sum(r.n_visual for r in records) / len(records)
    # visual tokens per layer, averaged over layers (= average_retention x N_v; what `eval` reports), and
    # those kept after the method's last stage (differs for multi-stage methods such as PyramidDrop)
    row["kept"] = sum(r.average_retention * r.n_visual for r in records) / len(records)
    row["kept_last_stage"] = sum(r.kept for r in records) / len(records)
    return row


def dedupe(records: list[Any]) -> list[Any]:
    """First record per id (lmms-eval pads ranks with copies of a request; the copies are dropped)."""
    seen: dict[str, Any] = {}
    for r in records:
        seen.setdefault(r.id, r)
    return list(seen.values())


def summarize(records: list[Any], *, model: str, method: str, ratio: float, text_only: int = 0,
              shape: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary: per task and overall means (see ``evaluation.report.MethodResult`` for definitions),
    plus every sample's record."""
    records = dedupe(records)
    tasks: dict[str, list[Any]] = {}
    for r in records:
        tasks.setdefault(r.kind, []).append(r)
    return {
        "model": model, "method": method, "ratio": ratio, **(extra or {}),
        "definitions": "as `explainprune eval`: per-sample means; kept = visual tokens per LLM layer averaged "
                       "over layers (kept_last_stage: after the method's last stage); average_retention = mean "
                       "over LLM layers of kept / N_v (Figure 3); flops = Eq. 4 per layer (+ Eq. 5-6 compressor "
                       "overhead); prefill_s and decode_s of the request's batch shared evenly; kv_bytes = KV "
                       "cache right after prefill (padding excluded)",
        "shape": asdict(shape) if shape is not None else None,
        "tasks": {name: _group(rows) for name, rows in tasks.items()},
        "overall": _group(records) if records else None,
        "text_only_requests": text_only,
        "samples": [{k: v for k, v in asdict(r).items() if k not in ("reference", "correct", "kind")}
                    | {"task": r.kind} for r in records],
    }


def to_markdown(summary: dict[str, Any]) -> str:
    """A table: one row per task (and overall)."""
    from explainprune.evaluation.report import BYTE_UNITS, FLOPS_UNITS, _unit

    head = "| task | n | visual tokens | kept (avg. over layers) | avg. retention | FLOPs | prefill | KV cache |"
    lines = [f"explainprune efficiency: {summary['model']}, {summary['method']} at ratio {summary['ratio']:g}"]
    cache = summary.get("use_cache")
    if cache:
        lines.append(f"measured {summary['overall']['n'] if summary['overall'] else 0} samples; "
                     f"{cache.get('answered_from_cache')} requests came from lmms-eval's cache ({cache['path']}) "
                     "and were not run")
    lines += ["", head, "|---|---|---|---|---|---|---|---|"]
    rows = dict(summary["tasks"])
    if len(rows) > 1 and summary["overall"]:
        rows["overall"] = summary["overall"]
    for name, r in rows.items():
        fs, fu = _unit(r["flops"], FLOPS_UNITS)
        bs, bu = _unit(r["kv_bytes"], BYTE_UNITS)
        lines.append(f"| {name} | {r['n']} | {r['n_visual']:.1f} | {r['kept']:.1f} "
                     f"| {100 * r['average_retention']:.1f}% | {r['flops'] / fs:.3g} {fu} "
                     f"| {1000 * r['prefill_s']:.1f} ms | {r['kv_bytes'] / bs:.3g} {bu} |")
    return "\n".join(lines)


def write(summary: dict[str, Any], directory: str | Path, stamp: str) -> Path:
    """``{stamp}_explainprune_efficiency.json`` (+ ``.md``) in ``directory``; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}_explainprune_efficiency.json"
    path.write_text(json.dumps(summary, indent=1))
    path.with_suffix(".md").write_text(to_markdown(summary) + "\n")
    return path
