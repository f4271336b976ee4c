"""``layer0``: the ablation that shows what f_θ adds — rank the visual tokens by the raw A_v^0.

Scores = the head-averaged first-layer attention from the instruction tokens to each visual token
(``first_layer_attention(vlm, prompt).mean(0)``), exactly the quantity the compressor reads, with no
network on top. The default f_θ (``train --preset default``) adds a skip path from the log of this head mean to
its output logits, so an untrained f_θ ranks exactly as this pruner and training learns a residual on top;
``train``'s guard compares the two on the validation split (docs/compressor.md). Same cost as ``learned``
minus f_θ: Eq. 5 only. Works on every supported family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from explainprune.cost import attention_flops
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register


@register("layer0")
@dataclass
class Layer0(Pruner):
    """Keeps the visual tokens with the highest head-averaged A_v^0."""

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: A_v^0 averaged over heads."""
        import torch

        from explainprune.attention import first_layer_attention

        with torch.no_grad():
            return first_layer_attention(vlm, prompt).mean(0).float().cpu()

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """Eq. 5: the first-layer attention A_v^0."""
        return attention_flops(n_visual, d)
