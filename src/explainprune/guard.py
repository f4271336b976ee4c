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

MIN_GROUP = 10  # validation samples a group needs before the guard judges it (smaller ones are noise)
Z = 2.0  # a group is behind when f_θ's mean paired margin over the input is below -Z standard errors
TOLERANCE = 0.005  # ... and below -TOLERANCE: a loss of rank score too small to matter is not held against f_θ


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


def group_indices(records: Sequence[LabelRecord]) -> dict[str, list[int]]:
    """The indices of ``records`` in each group (``group_of``), groups sorted by name."""
    ids: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        ids.setdefault(group_of(rec), []).append(i)
    return dict(sorted(ids.items()))


def sample_scores(scores: Sequence[Tensor], records: Sequence[LabelRecord], ratios: Sequence[float]) -> list[float]:
    """Each record's own rank score: its mean mass@r over the ratios, averaged with its mean region@r when it
    has a region (so a group's mean is its ``rank_score`` when all or none of its records have regions)."""
    out = []
    for s, rec in zip(scores, records, strict=True):
        mass = sum(kept_mass(s, rec.relevance, r) for r in ratios) / len(ratios)
        out.append((mass + sum(region_kept(s, rec.region, r) for r in ratios) / len(ratios)) / 2 if rec.region
                   else mass)
    return out


def compare_groups(mine: Sequence[float], theirs: Sequence[float], records: Sequence[LabelRecord]
                   ) -> dict[str, dict[str, float]]:
    """Per group (``group_of``, sorted): ``n``, the mean per-sample rank score of f_θ (``f_theta``) and of the
    input (``input``), the paired ``margin`` mean(f_θ − input) and its standard error ``se``."""
    out = {}
    for g, idx in group_indices(records).items():
        d = [mine[i] - theirs[i] for i in idx]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        out[g] = {"n": n, "f_theta": sum(mine[i] for i in idx) / n, "input": sum(theirs[i] for i in idx) / n,
                  "margin": mean, "se": (var / n) ** 0.5}
    return out


def is_behind(group: dict[str, float]) -> bool:
    """A group of at least ``MIN_GROUP`` samples where f_θ ranks worse than its input by more than ``Z``
    standard errors of the paired margin (a paired test at about the 5% level) and by more than
    ``TOLERANCE`` (on large inputs the margins are so consistent that a loss of 0.001 is "significant")."""
    margin = group["margin"]
    return group["n"] >= MIN_GROUP and margin < -TOLERANCE and margin + Z * group["se"] < 0


def selection_key(guard: dict[str, Any], how: str = "groups") -> tuple[float, ...]:
    """What the guard maximises over epochs; ``guard``: an epoch's guard metrics (``rank_score``, ``groups``
    from ``compare_groups``). ``"guard"``: the pooled rank score. ``"groups"``: first whether no group is
    behind the input (``is_behind``), then the pooled rank score: the best epoch among those that rank no
    worse than the input on any kind and size (epoch 0, the input itself, always qualifies)."""
    if how == "guard":
        return (guard["rank_score"],)
    behind = any(is_behind(g) for g in guard.get("groups", {}).values())
    return (0.0 if behind else 1.0, guard["rank_score"])


def group_guard(compressor: Any, records: Sequence[LabelRecord], ratios: Sequence[float]
                ) -> list[tuple[str, int, dict[str, float], dict[str, float]]]:
    """(group, n, f_θ's guard metrics, the input's) per group of ``records``, then ``all`` (every record)."""
    import torch

    with torch.no_grad():
        mine = [compressor(rec.attention) for rec in records]
    theirs = input_scores(records)
    out = []
    for g, idx in group_indices(records).items():
        sub = [records[i] for i in idx]
        out.append((g, len(idx), guard_metrics([mine[i] for i in idx], sub, ratios),
                    guard_metrics([theirs[i] for i in idx], sub, ratios)))
    return out + [("all", len(records), guard_metrics(mine, records, ratios), guard_metrics(theirs, records, ratios))]


@dataclass
class Guard:
    """The kept epoch's guard numbers beside the input's (``epoch`` 0 = the untrained f_θ); ``groups``: both
    per group of validation samples (``group_of``: kind and number of visual tokens), as ``compare_groups``
    gives them: ``{group: {"n", "f_theta", "input", "margin", "se"}}``."""

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
        """The groups where f_θ ranks worse than its input beyond noise (``is_behind``)."""
        return [g for g, v in self.groups.items() if is_behind(v)]

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
