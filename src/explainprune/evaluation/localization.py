"""Localization quality of per-visual-token scores: how much of a score falls in the ground-truth region.

Per sample, for a score s [N_v] and a region G (visual-token indices that hold the answer):
  - region mass: sum_{i in G} s_i^+ / sum_i s_i^+ with s^+ = max(s, 0): the share of the score's
    positive mass inside G ("relevance mass accuracy", Arras et al., 2022, CLEVR-XAI; the
    "energy-based pointing game" of Score-CAM, Wang et al., 2020). Scores are clipped at 0 before
    normalising; a score with no positive mass says nothing and gets the uniform share |G| / N_v.
  - pointing game (Zhang et al., 2016, "Top-down neural attention by excitation backprop"): 1 when the
    top-scoring token lies in G, 0 otherwise; tied maxima count as the share of the ties inside G.
  - chance: |G| / N_v, the expected value of both metrics for a score that carries no information.
  - rank AUC: the probability that a region token outscores a non-region token, ties counting half
    (the Mann-Whitney U statistic over |G| (N_v - |G|) pairs; chance 0.5). Pruning keeps the top-ranked
    tokens, so the ranking matters even where the mass is spread thin.

The metric functions are pure. ``measure`` runs scorers (R_v, A_v^0, FastV, random, see
``default_scorers``) over a label source with regions (``explainprune.sources.DigitsSource``) and keeps,
by default, only the samples the model answers correctly (the relevance explains a right answer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

Scorer = Callable[[Any, Any, list[int]], Tensor]  # (vlm, prompt, answer ids) -> Tensor[N_v]
ALL = "all"
REASONS = ("wrong answer", "no usable region")  # the latter: missing, empty, or every visual token


# -- metrics (pure) --------------------------------------------------------------------------------------
def _checked(scores: Tensor | Sequence[float], region: Sequence[int]) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D vector [N_v]; got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    idx = torch.as_tensor(list(region), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("the region is empty: localization is undefined")
    if int(idx.min()) < 0 or int(idx.max()) >= s.numel():
        raise ValueError(f"region indices must lie in 0..{s.numel() - 1}; got {idx.tolist()}")
    if len(set(idx.tolist())) != idx.numel():
        raise ValueError(f"region indices repeat: {idx.tolist()}")
    return s, idx


def chance_level(region: Sequence[int], num_visual: int) -> float:
    """|G| / N_v: both metrics' expectation for an uninformative (uniformly random) score."""
    if num_visual <= 0:
        raise ValueError(f"num_visual must be positive; got {num_visual}")
    return len(set(int(i) for i in region)) / num_visual


def region_mass(scores: Tensor | Sequence[float], region: Sequence[int]) -> float:
    """Share of max(scores, 0)'s mass inside ``region`` (indices into scores [N_v]); |G|/N_v if no mass."""
    s, idx = _checked(scores, region)
    pos = s.clamp(min=0)
    total = float(pos.sum())
    if total <= 0.0:
        return chance_level(idx.tolist(), s.numel())
    return float(pos[idx].sum()) / total


def pointing_hit(scores: Tensor | Sequence[float], region: Sequence[int]) -> float:
    """1.0 if the top-scoring token is in ``region``, else 0.0; tied maxima: the share of them in it."""
    s, idx = _checked(scores, region)
    top = s == s.max()
    inside = torch.zeros_like(top)
    inside[idx] = True
    return float((top & inside).sum()) / float(top.sum())


def region_auc(scores: Tensor | Sequence[float], region: Sequence[int]) -> float:
    """P(s_i > s_j) + P(s_i = s_j) / 2 for i in ``region``, j outside it (Mann-Whitney U / (|G| |not G|))."""
    s, idx = _checked(scores, region)
    inside = torch.zeros(s.numel(), dtype=torch.bool)
    inside[idx] = True
    if bool(inside.all()):
        raise ValueError("the region covers every token: the rank AUC is undefined")
    others = torch.sort(s[~inside]).values
    below = torch.searchsorted(others, s[inside], right=False).double()
    at_or_below = torch.searchsorted(others, s[inside], right=True).double()
    return float((below + 0.5 * (at_or_below - below)).sum()) / (idx.numel() * others.numel())


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of a normal-approximation 95% interval, 1.96 * sd / sqrt(n)); (nan, nan) if empty."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, 1.96 * sd / math.sqrt(len(v))


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval (lo, hi) of a rate ``p`` observed on ``n`` samples (Wilson, 1927).

    Unlike mean ± 1.96 sd / sqrt(n) it stays informative at 0/n and n/n (0 hits in 40 -> up to 0.088).
    """
    if n <= 0 or math.isnan(p):
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if p <= 0 else lo), (1.0 if p >= 1 else hi)  # exact ends despite rounding


# -- results ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleLocalization:
    """One scored sample: region mass, pointing hit and rank AUC per method."""

    id: str
    kind: str
    num_visual: int
    region_size: int
    mass: dict[str, float]
    hit: dict[str, float]
    auc: dict[str, float] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return self.region_size / self.num_visual


@dataclass
class LocalizationReport:
    """Per-sample results, skip counts (kind -> reason -> count) and run info; summaries per kind + all."""

    methods: list[str]
    samples: list[SampleLocalization] = field(default_factory=list)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        seen = list(self.skipped) + [s.kind for s in self.samples]  # ``measure`` fills skipped in order
        return list(dict.fromkeys(seen))

    def summary(self) -> dict[str, dict[str, Any]]:
        """kind (and "all") -> used, skipped (reason -> count), N_v and chance (means), and per method:
        mass and auc {"mean", "ci95"} (normal half-width), hit {"mean", "lo", "hi"} (Wilson 95% interval)."""
        out: dict[str, dict[str, Any]] = {}
        for kind in [*self.kinds(), ALL]:
            rows = self._rows(kind)
            skips = {r: sum(v.get(r, 0) for k, v in self.skipped.items() if kind in (ALL, k)) for r in REASONS}
            mass, hit, auc = {}, {}, {}
            for m in self.methods:
                mean, half = mean_ci([s.mass[m] for s in rows])
                mass[m] = {"mean": mean, "ci95": half}
                mean, half = mean_ci([s.auc[m] for s in rows if m in s.auc])
                auc[m] = {"mean": mean, "ci95": half}
                rate = _mean([s.hit[m] for s in rows])
                lo, hi = wilson_interval(rate, len(rows))
                hit[m] = {"mean": rate, "lo": lo, "hi": hi}
            out[kind] = {"used": len(rows), "skipped": skips, "num_visual": _mean([s.num_visual for s in rows]),
                         "chance": _mean([s.chance for s in rows]), "mass": mass, "hit": hit,
                         "auc": auc}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"methods": list(self.methods), "info": dict(self.info), "summary": self.summary(),
                "skipped": self.skipped, "samples": [asdict(s) for s in self.samples]}

    def to_markdown(self, digits: int = 3) -> str:
        """Four tables (samples; region mass, mean ± 95% CI; pointing game, rate [Wilson 95%]; rank AUC):
        kinds as columns, methods as rows, the chance level as the last row."""
        summ = self.summary()
        cols = list(summ)

        def num(x: float) -> str:
            return "-" if math.isnan(x) else f"{x:.{digits}f}"

        def mass(d: dict[str, float]) -> str:
            return num(d["mean"]) + ("" if math.isnan(d["ci95"]) else f" ± {d['ci95']:.{digits}f}")

        def hit(d: dict[str, float]) -> str:
            return num(d["mean"]) + ("" if math.isnan(d["lo"]) else f" [{num(d['lo'])}, {num(d['hi'])}]")

        def table(title: str, rows: list[tuple[str, list[str]]]) -> list[str]:
            head = [f"**{title}**", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            return head + [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows] + [""]

        counts = [("used (answered correctly)" if self.info.get("only_correct", True) else "used",
                   [str(summ[c]["used"]) for c in cols])]
        counts += [(f"skipped: {r}", [str(summ[c]["skipped"][r]) for c in cols]) for r in REASONS]
        counts.append(("N_v (mean)", [f"{summ[c]['num_visual']:.1f}" for c in cols]))
        lines = table("Samples", counts)
        chance = ("chance (region size / N_v)", [num(summ[c]["chance"]) for c in cols])
        rows = [(m, [mass(summ[c]["mass"][m]) for c in cols]) for m in self.methods]
        lines += table("Region mass: share of max(score, 0) inside the ground-truth region (mean ± 95% CI)",
                       [*rows, chance])
        rows = [(m, [hit(summ[c]["hit"][m]) for c in cols]) for m in self.methods]
        lines += table("Pointing game: top-scoring token inside the region (hit rate [Wilson 95% interval])",
                       [*rows, chance])
        rows = [(m, [mass(summ[c]["auc"][m]) for c in cols]) for m in self.methods]
        lines += table("Rank AUC: P(a region token outscores a non-region token) (mean ± 95% CI)",
                       [*rows, ("chance", ["0.500"] * len(cols))])
        return "\n".join(lines)

    def _rows(self, kind: str) -> list[SampleLocalization]:
        return [s for s in self.samples if kind in (ALL, s.kind)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# -- runner ----------------------------------------------------------------------------------------------
def default_scorers(fastv_layers: Sequence[int] = (1, 2), seed: int = 0) -> dict[str, Scorer]:
    """name -> scorer: R_v (Eq. 1, for the given answer), A_v^0 (mean over heads), FastV layer-K score
    (the last prompt token's attention at layer K-1, mean over heads) for each K, and random scores.

    The random scores are fresh uniform draws per call from one generator seeded with ``seed``
    (reproducible for a fixed sample order). The ``random`` pruner is not used: it seeds by the prompt's
    token ids, so every image asked the same question gets the same scores, and on digits the question
    fixes the region for "rowcol" (and "video"), which makes its hits all-or-nothing per question."""
    from explainprune.attention import first_layer_attention
    from explainprune.pruning.fastv import FastV
    from explainprune.relevance import relevance

    scorers: dict[str, Scorer] = {
        "R_v (Eq. 1)": lambda vlm, prompt, ids: relevance(vlm, prompt, answer=ids).scores,
        "A_v^0 (head mean)": lambda vlm, prompt, ids: first_layer_attention(vlm, prompt).mean(0),
    }
    for k in fastv_layers:
        fastv = FastV(layer=int(k))
        scorers[f"FastV K={k}"] = lambda vlm, prompt, ids, f=fastv: f.score(vlm, prompt)
    gen = torch.Generator().manual_seed(seed)
    scorers["random"] = lambda vlm, prompt, ids: torch.rand(prompt.num_visual, generator=gen)
    return scorers


def head_scorers(num_heads: int) -> dict[str, Scorer]:
    """name -> scorer for each single head h of A_v^0 (diagnostic: the head mean can hide a head's signal)."""
    from explainprune.attention import first_layer_attention

    return {f"A_v^0 head {h}": lambda vlm, prompt, ids, h=h: first_layer_attention(vlm, prompt)[h]
            for h in range(num_heads)}


def measure(vlm: Any, source: Any, scorers: dict[str, Scorer] | None = None, *, only_correct: bool = True,
            max_new_tokens: int = 4, progress: bool = False) -> LocalizationReport:
    """Score every sample of ``source`` (``LabelSample``s with ``region``) with each scorer.

    The model answers greedily; with ``only_correct`` wrong answers are skipped (counted). The answer's
    tokens (end-of-sequence removed) are what R_v explains.
    """
    from tqdm.auto import tqdm

    from explainprune.labels import answers_match, region_indices

    scorers = scorers if scorers is not None else default_scorers()
    report = LocalizationReport(methods=list(scorers), info={"only_correct": only_correct,
                                                             "scores": "clipped at 0, then normalised"})
    start = time.perf_counter()
    for i in tqdm(range(len(source)), disable=not progress, unit="sample", desc="localization"):
        sample = source[i]
        kind = str(sample.meta.get("kind", "")) or "-"
        prompt = vlm.prepare(images=sample.images, video=sample.video, question=sample.question)
        region = region_indices(sample.region, prompt.visual_grid)
        gen = vlm.generate(prompt, max_new_tokens=max_new_tokens)
        ids = [t for t in gen.token_ids if t not in vlm.eos_token_ids]
        bucket = report.skipped.setdefault(kind, {})  # also records the order kinds appear in
        reason = None
        if not region or len(region) >= prompt.num_visual:
            reason = "no usable region"
        elif only_correct and not (ids and answers_match(gen.text, sample.answer)):
            reason = "wrong answer"
        elif not ids:
            ids = vlm.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
        if reason:
            bucket[reason] = bucket.get(reason, 0) + 1
            continue
        scores = {name: fn(vlm, prompt, ids).detach().float().cpu() for name, fn in scorers.items()}
        report.samples.append(SampleLocalization(
            id=str(sample.id), kind=kind, num_visual=prompt.num_visual, region_size=len(region),
            mass={n: region_mass(s, region) for n, s in scores.items()},
            hit={n: pointing_hit(s, region) for n, s in scores.items()},
            auc={n: region_auc(s, region) for n, s in scores.items()}))
    report.info["seconds"] = round(time.perf_counter() - start, 2)
    return report
