"""The oracle pruner: keeps the visual tokens with the highest explainability relevance R_v (Table 1).

It first generates the answer greedily on the full input, explains it (Eq. 1, ``explainprune.relevance``)
and ranks the visual tokens by R_v: an upper bound that needs the answer before pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register
from explainprune.relevance import check_rule, relevance


@register("oracle")
@dataclass
class Oracle(Pruner):
    """Scores = R_v of the model's own greedy answer. rule: "grad" (Eq. 1) or "mean" (Table 4)."""

    rule: str = "grad"
    clamp: bool = True
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        check_rule(self.rule)

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """R_v, Tensor[N_v]."""
        return relevance(vlm, prompt, None, rule=self.rule, clamp=self.clamp,
                         max_new_tokens=self.max_new_tokens).scores
