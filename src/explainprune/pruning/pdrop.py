"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"), inference-only variant.

The LLM is split into S stages at layers K_1 < ... < K_{S-1}; at each boundary a share of the remaining
visual tokens is dropped, so stage s keeps λ^s of them (the paper's method). The ranking at a boundary is the
attention of the LAST instruction token to the visual tokens, computed lightly with the boundary layer's
own ``input_layernorm`` / ``q_proj`` / ``k_proj`` on the hidden states entering it (the authors'
``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py``: query = last token, keys = all tokens,
softmax, then the image columns are ranked).

Authors' defaults (README, ``scripts/v1_5/pdrop_eval``): 4 stages, boundaries after layers 8, 16, 24 of a
32-layer LLM (L/4, L/2, 3L/4), λ = 0.5. Here the boundaries default to round(L/4), round(L/2),
round(3L/4) (distinct, in 1..L-1), and ``ratio`` is the AVERAGE retention over layers (the paper's
Table 7 reports PyramidDrop at its average): λ is solved so that mean over layers of kept / N_v = ratio.
A ratio below K_1 / L (the layers before the first boundary keep everything) cannot be reached: λ = 0 is
used then (one visual token after K_1), and the report shows the average retention actually reached.
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


def pdrop_stage(layer: int, share: float) -> Stage:
    """One boundary: keep ceil(share * N_v) by the last token's attention at layer K (its own q/k)."""

    def choose(ctx: StageContext) -> list[Tensor]:
        block = ctx.vlm.language_model.layers[ctx.layer]
        h = block.input_layernorm(ctx.hidden)
        attn = block.self_attn
        cos, sin = ctx.rope
        dev = h.device
        att = last_token_attention(attn, attn.q_proj(h[:, -1:]), attn.k_proj(h), cos.to(dev), sin.to(dev),
                                   ctx.valid.to(dev)).mean(1).cpu()                # [B, Lc]
        return [top_k(att[b, rows.cpu()], k) for b, (rows, k) in enumerate(zip(ctx.visual_rows, ctx.budgets))]

    return Stage(layer=layer, count=lambda n: kept_count(n, share), choose=choose)


@register("pdrop")
@dataclass
class PyramidDrop(SetInLLM, Pruner):
    """PyramidDrop: multi-stage drop ranked by the last instruction token's attention at each boundary.

    layers: stage boundaries (default round(L/4), round(L/2), round(3L/4)); lam: fixed λ (the authors' 0.5)
    instead of solving it from the ratio. ``layer`` (the first boundary) is what the report shows.
    """

    layers: tuple[int, ...] | None = None
    lam: float | None = None

    def __post_init__(self) -> None:
        if self.lam is not None and not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"pdrop lam must be in [0, 1]; got {self.lam}")
        self.layer = 0  # set from the model on first use (the first boundary)

    def _layers(self, vlm: VLM) -> tuple[int, ...]:
        n = len(vlm.language_model.layers)
        if n < 2:
            raise ValueError(f"pdrop needs an LLM with at least 2 layers; this one has {n}")
        ks = tuple(int(k) for k in self.layers) if self.layers is not None else default_layers(n)
        self.layer = ks[0]
        return ks

    def stages(self, vlm: VLM, ratio: float) -> list[Stage]:
        self._layers(vlm)
        return self.schedule(len(vlm.language_model.layers), ratio)

    def schedule(self, num_layers: int, ratio: float) -> list[Stage]:
        """The stages on a ``num_layers``-layer LLM at ``ratio`` (also what ``tokens_per_layer`` counts)."""
        ks = tuple(int(k) for k in self.layers) if self.layers is not None else default_layers(num_layers)
        lam = float(self.lam) if self.lam is not None else solve_lambda(float(ratio), ks, num_layers)
        return [pdrop_stage(k, lam ** (s + 1)) for s, k in enumerate(ks)]

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        raise NotImplementedError("pdrop ranks inside the LLM at every stage: use generate (no single score)")

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> InLLMResult | list[InLLMResult]:
        select(torch.ones(1), ratio)  # validates the ratio before any work
        return generate_inllm(vlm, prompt, self.stages(vlm, ratio), max_new_tokens, **kwargs)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """The boundary ranking: keys of the visual tokens entering each boundary + the last query (Eq. 5 form)."""
        ks = self.layers if self.layers is not None else default_layers(len(tokens_per_layer))
        return sum(attention_flops(tokens_per_layer[k - 1], d) for k in ks)
