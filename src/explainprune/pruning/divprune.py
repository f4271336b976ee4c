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
from explainprune.pruning.base import Pruner, register, select


def cosine_distance(x: Tensor) -> Tensor:
    """[N, D] -> [N, N]: 1 - cosine similarity (float32)."""
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return 1.0 - x @ x.T


def max_min_order(features: Tensor, steps: int | None = None) -> Tensor:
    """Greedy max-min diversity order of the N rows of ``features`` [N, D]: LongTensor[steps] of indices
    (default all N), on the features' device.

    Runs where the features are (the model's device) with no host round trip per step: each step is one
    argmax and one row minimum on the device, queued without a sync; only ``steps`` picks are made (the
    kept count, not N). The cosine matrix is [N, N] float32 (0.9 GB at 15K tokens)."""
    dist = cosine_distance(features)
    n = dist.shape[0]
    steps = n if steps is None else max(1, min(int(steps), n))
    order = torch.empty(steps, dtype=torch.long, device=dist.device)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=dist.device)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nearest = dist.masked_fill(eye, float("inf")).min(0).values
    del eye
    pick = torch.argmax(nearest)
    chosen = torch.zeros(n, dtype=torch.bool, device=dist.device)
    order[0] = pick
    chosen[pick] = True
    min_dist = dist[pick].clone()
    for i in range(1, steps):
        pick = torch.argmax(min_dist.masked_fill(chosen, float("-inf")))
        order[i] = pick
        chosen[pick] = True
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
        order = max_min_order(self._features(prompt)).cpu()
        scores = torch.empty(prompt.num_visual)
        scores[order] = -torch.arange(prompt.num_visual, dtype=torch.float32)
        return scores

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        """The first ``ceil(ratio * N_v)`` greedy picks, made on the model's device (only those steps run);
        the same set as ``select(score(...), ratio)``."""
        n = prompt.num_visual
        if n == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        k = len(select(torch.zeros(n), ratio))  # the shared rounding (and ratio checks) of select
        return torch.sort(max_min_order(self._features(prompt), steps=k).cpu()).values

    @staticmethod
    def _features(prompt: Prompt) -> Tensor:
        """[N_v, D] visual features where the prompt's embeddings are (the model's device)."""
        embeds = prompt.inputs_embeds
        return embeds[0, prompt.visual_pos.to(embeds.device)].detach()

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """The pairwise cosine matrix (n^2 d) and the greedy min-updates (n per kept token)."""
        kept = tokens_per_layer[0] if tokens_per_layer else n_visual
        return n_visual * n_visual * d + kept * n_visual
