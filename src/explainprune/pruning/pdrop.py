"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"), inference-only variant.

The LLM is split into S stages at layers K_1 < ... < K_{S-1}; at each boundary the visual tokens are ranked
by the attention of the LAST instruction token, computed lightly with the boundary layer's own
``input_layernorm`` / ``q_proj`` / ``k_proj`` on the hidden states entering it, and stage s keeps
int(N_v * λ^s) of them (the authors' ``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py``:
query = last prompt token, keys = all tokens, softmax, mean over heads, the image columns ranked; kept
count ``int(N_v * ratio_list[s])``, at least 1 here).

The authors' setting (README, ``scripts/v1_5/pdrop_eval/*.sh``, the only one their scripts use): 4 stages,
``--layer_list [8,16,24]`` of a 32-layer LLM (L/4, L/2, 3L/4), ``--image_token_ratio_list
[0.5,0.25,0.125]`` (λ = 0.5), i.e. an average retention over layers of 15/32 = 46.9%. Positions: after
every drop the sequence is renumbered 0..L'-1 (prefill and decode).

``ratio`` is the AVERAGE retention over layers (what the field reports for a multi-stage method). The
default ``schedule="authors"`` maps it to a setting as the authors' (never collapsing to one token):
  - ratio >= the authors' average (15/32 at L = 32): their boundaries round(L/4), round(L/2), round(3L/4),
    λ solved from the ratio (>= 0.5; λ = 0.5 exactly at their average);
  - below: λ = 0.5 fixed and the boundaries moved earlier, evenly spaced K, 2K, 3K, with the integer K
    in 1..round(L/4) whose average retention is nearest the ratio;
  - below what K = 1 reaches (1/8 + 11/(8L)): boundaries 1, 2, 3 and λ solved from the ratio (< 0.5);
    a ratio no λ reaches (<= K_1 / L, e.g. 25% of a 4-layer LLM) takes λ = ratio^(1/S), so the last stage
    keeps ratio * N_v, instead of one token per stage (the average retention reached is then above it).
``schedule="solve"`` is the former rule (the authors' boundaries, λ solved; λ = 0, one token per stage,
below K_1 / L). ``layers`` / ``lam`` given explicitly override the schedule (``lam=0.5`` alone is the
authors' literal command line). ``positions``: "compact" (authors: renumbered after each drop) or
"original" (kept tokens keep their positions); on M-RoPE families (Qwen-VL) positions always stay
original (the authors' code is LLaVA-only and a renumbering of 3-row positions is not defined).
``budget``: "authors" (int(N_v λ^s)) or "exact" (ceil). ``tokens_per_layer(N_v, ratio, L)`` gives each
layer's visual tokens without a model; the average retention reached is their mean / N_v.
Works on every supported family (tested on all six of ``testing.FAMILIES``, Qwen3-VL DeepStack rows
following the kept tokens); ragged batches; the KV cache of every stage holds only its kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explainprune.cost import attention_flops, kept_count
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register, select
from explainprune.pruning.inllm import (
    InLLMResult,
    SetInLLM,
    Stage,
    StageContext,
    generate_inllm,
    last_token_attention,
    top_k,
)

AUTHORS_LAMBDA = 0.5


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Stage boundaries at round(L/4), round(L/2), round(3L/4) (8, 16, 24 for L = 32), distinct, in 1..L-1."""
    ks = sorted({min(max(round(num_layers * f), 1), num_layers - 1) for f in (0.25, 0.5, 0.75)})
    return tuple(ks)


def average_retention(lam: float, layers: tuple[int, ...], num_layers: int) -> float:
    """Mean over layers of the kept share when stage s keeps λ^s (continuous, before rounding)."""
    bounds = [0, *layers, num_layers]
    return sum(lam**s * (bounds[s + 1] - bounds[s]) for s in range(len(bounds) - 1)) / num_layers


def solve_lambda(ratio: float, layers: tuple[int, ...], num_layers: int) -> float:
    """λ in [0, 1] with ``average_retention(λ) = ratio`` (bisection; 0 when the ratio is out of reach)."""
    lo, hi = 0.0, 1.0
    if average_retention(0.0, layers, num_layers) >= ratio:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average_retention(mid, layers, num_layers) < ratio else (lo, mid)
    return (lo + hi) / 2


def authors_schedule(ratio: float, num_layers: int) -> tuple[tuple[int, ...], float]:
    """(boundaries, λ) for an average retention ``ratio`` as the authors set PyramidDrop (module docstring):
    their L/4, L/2, 3L/4 and λ >= 0.5 above their average; λ = 0.5 and boundaries K, 2K, 3K below it;
    boundaries 1, 2, 3 and λ < 0.5 below what K = 1 reaches."""
    base = default_layers(num_layers)
    if ratio >= average_retention(AUTHORS_LAMBDA, base, num_layers):
        return base, solve_lambda(ratio, base, num_layers)
    stages = len(base)
    spaced = [tuple(k * s for s in range(1, stages + 1)) for k in range(1, base[0] + 1)
              if k * stages < num_layers]
    spaced = spaced or [base]
    reach = [abs(average_retention(AUTHORS_LAMBDA, ks, num_layers) - ratio) for ks in spaced]
    best = spaced[min(range(len(spaced)), key=lambda i: (reach[i], i))]
    if best == spaced[0] and average_retention(AUTHORS_LAMBDA, best, num_layers) > ratio:
        lam = solve_lambda(ratio, best, num_layers)
        # out of reach (the layers before K_1 alone exceed the ratio): rather than one token per stage,
        # the last stage keeps ratio * N_v (λ = ratio^(1/S)); the report shows the average reached
        return best, (lam if lam > 0 else float(ratio) ** (1 / len(best)))
    return best, AUTHORS_LAMBDA


def stage_count(n_visual: int, share: float, budget: str = "authors") -> int:
    """Visual tokens a stage keeping ``share`` of N_v keeps: int(N_v share) (authors) or ceil; at least 1."""
    if budget == "exact":
        return kept_count(n_visual, share)
    return max(1, int(n_visual * share + 1e-9))


def pdrop_stage(layer: int, share: float, budget: str = "authors") -> Stage:
    """One boundary: keep ``stage_count(N_v, share)`` by the last token's attention at layer K (its own q/k)."""

    def choose(ctx: StageContext) -> list[Tensor]:
        block = ctx.vlm.language_model.layers[ctx.layer]
        h = block.input_layernorm(ctx.hidden)
        attn = block.self_attn
        cos, sin = ctx.rope
        dev = h.device
        att = last_token_attention(attn, attn.q_proj(h[:, -1:]), attn.k_proj(h), cos.to(dev), sin.to(dev),
                                   ctx.valid.to(dev)).mean(1).cpu()                # [B, Lc]
        return [top_k(att[b, rows.cpu()], k) for b, (rows, k) in enumerate(zip(ctx.visual_rows, ctx.budgets))]

    return Stage(layer=layer, count=lambda n: stage_count(n, share, budget), choose=choose)


@register("pdrop")
@dataclass
class PyramidDrop(SetInLLM, Pruner):
    """PyramidDrop: multi-stage drop ranked by the last instruction token's attention at each boundary.

    schedule: "authors" | "solve" (how the average retention ``ratio`` maps to boundaries and λ, see the
    module docstring); layers / lam: explicit boundaries / λ (override the schedule); positions:
    "compact" (authors) | "original"; budget: "authors" (floor) | "exact" (ceil). ``layer`` (the first
    boundary) is what the report shows.
    """

    layers: tuple[int, ...] | None = None
    lam: float | None = None
    schedule: str = "authors"
    positions: str = "compact"
    budget: str = "authors"

    def __post_init__(self) -> None:
        if self.lam is not None and not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"pdrop lam must be in [0, 1]; got {self.lam}")
        for name, value, allowed in (("schedule", self.schedule, ("authors", "solve")),
                                     ("positions", self.positions, ("compact", "original")),
                                     ("budget", self.budget, ("authors", "exact"))):
            if value not in allowed:
                raise ValueError(f"pdrop {name} must be one of {', '.join(allowed)}; got {value!r}")
        self.layer = 0  # set from the model on first use (the first boundary)

    def plan(self, num_layers: int, ratio: float) -> tuple[tuple[int, ...], float]:
        """(boundaries, λ) used at ``ratio`` on an LLM of ``num_layers`` layers (no model needed)."""
        if num_layers < 2:
            raise ValueError(f"pdrop needs an LLM with at least 2 layers; this one has {num_layers}")
        ratio = float(ratio)
        if self.layers is not None:
            ks = tuple(int(k) for k in self.layers)
        elif self.lam is not None or self.schedule == "solve":
            ks = default_layers(num_layers)
        else:
            ks, lam = authors_schedule(ratio, num_layers)
            return ks, (float(self.lam) if self.lam is not None else lam)
        return ks, (float(self.lam) if self.lam is not None else solve_lambda(ratio, ks, num_layers))

    def tokens_per_layer(self, n_visual: int, ratio: float, num_layers: int) -> list[int]:
        """Visual tokens each LLM layer sees at ``ratio`` (what ``InLLMResult.visual_per_layer`` reports)."""
        ks, lam = self.plan(num_layers, ratio)
        counts, current = [], n_visual
        bounds = [*ks, num_layers]
        counts += [n_visual] * ks[0]
        for s in range(len(ks)):
            current = min(current, stage_count(n_visual, lam ** (s + 1), self.budget))
            counts += [current] * (bounds[s + 1] - bounds[s])
        return counts

    def stages(self, vlm: VLM, ratio: float) -> list[Stage]:
        ks, lam = self.plan(len(vlm.language_model.layers), ratio)
        self.layer = ks[0]
        return [pdrop_stage(k, lam ** (s + 1), self.budget) for s, k in enumerate(ks)]

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        raise NotImplementedError("pdrop ranks inside the LLM at every stage: use generate (no single score)")

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> InLLMResult | list[InLLMResult]:
        select(torch.ones(1), ratio)  # validates the ratio before any work
        first = prompt if isinstance(prompt, Prompt) else list(prompt)[0]
        positions = self.positions if first.position_ids.dim() == 2 else "original"  # M-RoPE: original
        return generate_inllm(vlm, prompt, self.stages(vlm, ratio), max_new_tokens, positions=positions, **kwargs)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """The boundary ranking: keys of the visual tokens entering each boundary + the last query (Eq. 5 form);
        the boundaries are the layers where ``tokens_per_layer`` drops."""
        ks = [k for k in range(1, len(tokens_per_layer)) if tokens_per_layer[k] < tokens_per_layer[k - 1]]
        return sum(attention_flops(tokens_per_layer[k - 1], d) for k in ks)


def reached_retention(n_visual: int, ratio: float, num_layers: int, **options: Any) -> float:
    """Average retention over layers PyramidDrop reaches at nominal ``ratio`` (its mean kept share)."""
    counts = PyramidDrop(**options).tokens_per_layer(n_visual, ratio, num_layers)
    return sum(counts) / (num_layers * n_visual)
