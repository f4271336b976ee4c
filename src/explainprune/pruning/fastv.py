"""FastV (Chen et al., 2024): prune visual tokens INSIDE the LLM, at layer K.

Layers 0..K-1 run on the full sequence. The visual tokens are ranked by the attention the LAST prompt
token gives them at layer K-1 (softmax row, mean over heads); the shared ``select`` keeps the top
``ratio``, and layers K..N-1 run on the shorter sequence, their KV cache included, so decode is cheaper too.

It is one ``Stage`` of the shared in-LLM machinery (``pruning.inllm``: reversible hooks on the model's own
decoder layers, ragged batches re-padded at layer K, kept tokens at their ORIGINAL positions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explainprune.attention import _Stop  # the layer-K hook's early exit (scores only)
from explainprune.cost import kept_count
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register, select
from explainprune.pruning.inllm import (  # noqa: F401  (last_token_attention: re-exported)
    InLLMResult,
    InLLMState,
    Stage,
    StageContext,
    generate_inllm,
    inllm_hooks,
    last_token_attention,
    top_k,
)

FastVState = InLLMState


def fastv_stage(ratio: float, layer: int) -> Stage:
    """FastV's one stage: before layer K, keep the top ``ratio`` by layer K-1's last-token attention."""

    def choose(ctx: StageContext) -> list[Tensor]:
        att = ctx.previous_attention().cpu()                                    # [B, Lc]
        scores = [att[b, rows.cpu()] for b, rows in enumerate(ctx.visual_rows)]
        choose.scores = scores  # type: ignore[attr-defined]
        return [top_k(s, k) for s, k in zip(scores, ctx.budgets)]

    return Stage(layer=layer, count=lambda n: kept_count(n, ratio), choose=choose)


@contextmanager
def fastv_hooks(vlm: VLM, prompts: Prompt | list[Prompt], ratio: float, layer: int, *,
                scores_only: bool = False) -> Iterator[InLLMState]:
    """Hooks that make the next forward / generate on ``prompts`` run FastV (see ``inllm.inllm_hooks``).

    With ``scores_only`` the prefill stops at layer K (``_Stop`` raised; caught by the caller, see
    ``FastV.score``). Yields the state filled during prefill; ``state.scores`` holds the attention scores.
    """
    n_layers = len(vlm.language_model.layers)
    if not 1 <= layer < n_layers:
        raise ValueError(f"fastv layer must be in 1..{n_layers - 1} for a {n_layers}-layer LLM; got {layer}")
    stage = fastv_stage(ratio, layer)
    with inllm_hooks(vlm, prompts, [stage], capture_previous=True, stop_after_first=scores_only) as state:
        try:
            yield state
        finally:
            state.scores = list(getattr(stage.choose, "scores", []))


@dataclass
class FastVResult(InLLMResult):
    """A GenerationResult plus what FastV kept: ``visual_tokens`` counts the visual tokens of layers >= K,
    ``layer_tokens`` the prompt tokens each layer processes, ``visual_per_layer`` the visual ones."""


@register("fastv")
@dataclass
class FastV(Pruner):
    """FastV: keep the visual tokens the last prompt token attends to most at layer K-1, from layer K on.

    ``layer`` = K (FastV's default 2; the paper also uses 4). ``score`` runs layers 0..K-1 only.
    """

    layer: int = 2  # type: ignore[misc]  # overrides the ClassVar default: the layer it prunes at

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"fastv's layer K must be an integer >= 1 (layers 0..K-1 see every token); "
                             f"got {self.layer!r}")

    @torch.no_grad()
    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: the last prompt token's attention at layer K-1, averaged over heads."""
        dev = vlm.device
        with fastv_hooks(vlm, prompt, 1.0, self.layer, scores_only=True) as state:
            try:
                vlm.forward(prompt.inputs_embeds.to(dev), prompt.position_ids.to(dev),
                            prompt.attention_mask.to(dev), prompt=prompt, use_cache=False)
            except _Stop:
                pass
        return state.scores[0]

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> FastVResult | list[FastVResult]:
        """Greedy generation with FastV pruning at layer K (prefill and the KV cache of layers >= K).

        A list of prompts runs as one left-padded batch (ragged after pruning: re-padded at layer K).
        """
        select(torch.ones(1), ratio)  # validates the ratio before any work
        n_layers = len(vlm.language_model.layers)
        if not 1 <= self.layer < n_layers:
            raise ValueError(f"fastv layer must be in 1..{n_layers - 1} for a {n_layers}-layer LLM; got {self.layer}")
        return generate_inllm(vlm, prompt, [fastv_stage(ratio, self.layer)], max_new_tokens,
                              capture_previous=True, result_cls=FastVResult, **kwargs)
