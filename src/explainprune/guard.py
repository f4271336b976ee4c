"""The training guard: does f_θ rank the visual tokens better than its own input?

f_θ reads the first-layer attention A_v^0; ranking the tokens by A_v^0's plain head mean (the ``layer0``
pruner) is free. ``train`` scores both on its validation split at the deployment ratios, keeps the epoch
whose f_θ ranks best there and says so in one line when that f_θ still does not beat its input.

Per validation sample and ratio r, with ``kept = select(scores, r)`` (exactly the pruner's top-k):

* ``mass@r``:   the share of R_v (positive part) on the kept tokens, sum(R_v+[kept]) / sum(R_v+);
* ``region@r``: the share of the ground-truth region's tokens that are kept (labels with a region only).

``rank_score`` = the mean of mass@r over the ratios, averaged with the mean of region@r when the labels
carry regions: one number, higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from explainprune.labels import LabelRecord
from explainprune.pruning.base import select

MIN_GROUP = 20  # validation samples a group needs before the guard names it (smaller ones are noise)


def kept_mass(scores: Tensor, relevance: Tensor, ratio: float) -> float:
    """sum(R_v+[top-k(scores)]) / sum(R_v+), k = ceil(ratio · N_v); ``ratio`` when R_v+ is all zero."""
    r = relevance.float().clamp(min=0)
    total = float(r.sum())
    return float(r[select(scores, ratio)].sum()) / total if total > 0 else ratio


def region_kept(scores: Tensor, region: Sequence[int], ratio: float) -> float:
    """|top-k(scores) ∩ region| / |region| (region: visual-token indices, non-empty)."""
    kept = set(select(scores, ratio).tolist())
    return sum(1 for i in region if i in kept) / len(region)


def guard_metrics(scores: Sequence[Tensor], records: Sequence[LabelRecord],
                  ratios: Sequence[float]) -> dict[str, float]:
    """Means over ``records`` of mass@r and region@r for each ratio, and ``rank_score``."""
    out: dict[str, float] = {}
    for r in ratios:
        out[f"mass@{r:g}"] = sum(kept_mass(s, rec.relevance, r) for s, rec in zip(scores, records, strict=True)) \
            / len(records)
    with_region = [(s, rec) for s, rec in zip(scores, records, strict=True) if rec.region]
    for r in ratios:
        if with_region:
            out[f"region@{r:g}"] = sum(region_kept(s, rec.region, r) for s, rec in with_region) / len(with_region)
    mass = sum(out[f"mass@{r:g}"] for r in ratios) / len(ratios)
    out["rank_score"] = (mass + sum(out[f"region@{r:g}"] for r in ratios) / len(ratios)) / 2 if with_region \
        else mass
    return out


def input_scores(records: Sequence[LabelRecord]) -> list[Tensor]:
    """f_θ's input used directly: the head mean of A_v^0 per record (what ``layer0`` ranks by)."""
    return [rec.attention.mean(0) for rec in records]


def group_of(record: LabelRecord) -> str:
    """The guard's group of a record: its kind and number of visual tokens, e.g. ``rowcol/256``."""
    return f"{record.kind or 'sample'}/{record.attention.shape[-1]}"


def by_group(scores: Sequence[Tensor], records: Sequence[LabelRecord], ratios: Sequence[float]
             ) -> dict[str, dict[str, float]]:
    """``guard_metrics`` per group (``group_of``), with ``n`` the group's sample count; groups sorted."""
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(group_of(rec), []).append(i)
    return {g: {"n": len(ids), **guard_metrics([scores[i] for i in ids], [records[i] for i in ids], ratios)}
            for g, ids in sorted(groups.items())}


def group_guard(compressor: Any, records: Sequence[LabelRecord], ratios: Sequence[float]
                ) -> list[tuple[str, int, dict[str, float], dict[str, float]]]:
    """(group, n, f_θ's guard metrics, the input's) per group of ``records``, then ``all`` (every record)."""
    import torch

    with torch.no_grad():
        mine = [compressor(rec.attention) for rec in records]
    theirs = input_scores(records)
    a, b = by_group(mine, records, ratios), by_group(theirs, records, ratios)
    out = [(g, int(a[g].pop("n")), a[g], {k: v for k, v in b[g].items() if k != "n"}) for g in a]
    return out + [("all", len(records), guard_metrics(mine, records, ratios), guard_metrics(theirs, records, ratios))]


@dataclass
class Guard:
    """The kept epoch's guard numbers beside the input's (``epoch`` 0 = the untrained f_θ); ``groups``: the
    rank score of both per group of validation samples (``group_of``: kind and number of visual tokens),
    ``{group: {"n", "f_theta", "input"}}``."""

    epoch: int
    ratios: list[float]
    f_theta: dict[str, float]
    input: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def beats_input(self) -> bool:
        return self.f_theta["rank_score"] > self.input["rank_score"]

    def behind(self) -> list[str]:
        """The groups of at least ``MIN_GROUP`` samples where f_θ ranks worse than its input (only when
        there are several groups)."""
        if len(self.groups) < 2:
            return []
        return [g for g, v in self.groups.items() if v["f_theta"] < v["input"] and v["n"] >= MIN_GROUP]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "beats_input": self.beats_input, "behind": self.behind(), "message": self.message()}

    def message(self) -> str:
        """One line; starts with "warning:" when f_θ does not beat its input (overall or on a group)."""
        ratios = "/".join(f"{100 * r:g}%" for r in self.ratios)
        what = "R_v mass and region" if any(k.startswith("region@") for k in self.input) else "R_v mass"
        detail = (f"validation rank score {self.f_theta['rank_score']:.4f} vs {self.input['rank_score']:.4f} for the "
                  f"head-mean A_v^0 ranking ({what} kept at {ratios}; epoch {self.epoch} kept)")
        behind = self.behind()
        groups = "; behind it on " + ", ".join(
            f"{g} ({self.groups[g]['f_theta']:.4f} vs {self.groups[g]['input']:.4f}, "
            f"{int(self.groups[g]['n'])} samples)" for g in behind) if behind else ""
        if self.beats_input and not behind:
            return f"guard: f_θ beats its input: {detail}"
        if self.beats_input:
            return f"warning: f_θ beats its input overall but not everywhere: {detail}{groups}"
        return (f"warning: f_θ does not beat its own input: {detail}{groups}; the layer0 pruner ranks at least as "
                "well without a network")
