"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models"): keep a maximally DIVERSE subset of the visual tokens, before the LLM, training-free.

Followed: the paper's Max-Min Diversity formulation and the authors' ``DivPrune`` in
``LLaVA/llava/model/llava_arch.py`` (read, not copied). Distance = 1 - cosine similarity between the
visual tokens' features as the LLM receives them (after the projector). Greedy: the first token is the
one farthest from its nearest neighbour; then, repeatedly, the token whose distance to the chosen set
(its minimum distance to any chosen token) is largest. The greedy order is a ranking whose every prefix
is the greedy subset of that size, so ``score`` returns minus the order and the shared ``select`` keeps
the top ceil(ratio * N_v) (the authors keep round(ratio * N_v); their default ratio is 0.098).
Already chosen tokens are never picked again (the authors' loop could re-pick one when every remaining
distance is 0). Works on every supported family (it only reads ``inputs_embeds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register


def cosine_distance(x: Tensor) -> Tensor:
    """[N, D] -> [N, N]: 1 - cosine similarity (float32)."""
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return 1.0 - x @ x.T


def max_min_order(features: Tensor) -> Tensor:
    """Greedy max-min diversity order of the N rows of ``features`` [N, D]: LongTensor[N] of indices."""
    dist = cosine_distance(features)
    n = dist.shape[0]
    order = torch.empty(n, dtype=torch.long)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).min(0).values
    first = int(torch.argmax(nearest))
    chosen = torch.zeros(n, dtype=torch.bool)
    order[0], chosen[first] = first, True
    min_dist = dist[first].clone()
    for i in range(1, n):
        pick = int(torch.argmax(min_dist.masked_fill(chosen, float("-inf"))))
        order[i], chosen[pick] = pick, True
        min_dist = torch.minimum(min_dist, dist[pick])
    return order


@register("divprune")
@dataclass
class DivPrune(Pruner):
    """Max-min diversity over the visual features (cosine distance); keeps a greedy prefix."""

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: minus the greedy rank (the first picked scores highest)."""
        if prompt.num_visual == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        feats = prompt.inputs_embeds[0, prompt.visual_pos].detach().cpu()
        order = max_min_order(feats)
        scores = torch.empty(prompt.num_visual)
        scores[order] = -torch.arange(prompt.num_visual, dtype=torch.float32)
        return scores

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """The pairwise cosine matrix (n^2 d) and the greedy min-updates (n per kept token)."""
        kept = tokens_per_layer[0] if tokens_per_layer else n_visual
        return n_visual * n_visual * d + kept * n_visual
