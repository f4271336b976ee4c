"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs"): before the LLM, keep the visual tokens a conditional DPP picks -- diverse AND
relevant to the instruction. Training-free.

Followed (read, not copied): ``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py`` of
github.com/Theia-4869/CDPruner (the kernel and the fast greedy MAP inference, after Chen et al.'s
Fast-MAP-DPP) and ``CLIPVisionTower.forward`` in ``llava/model/multimodal_encoder/clip_encoder.py`` (the
relevance inputs):
  - similarity S = cosine between the visual tokens' features AFTER the projector (as the LLM receives them);
  - relevance r_i = mean over the M instruction embeddings of MINUS the cosine of token i with each, then
    min-max scaled: (r - min r + 1e-6) / (max r - min r) (the authors' sign and epsilon);
  - kernel L = diag(r) S diag(r) (the optional exp(theta ...) re-weighting is commented out in their code:
    off here too);
  - greedy MAP: repeatedly take the token with the largest remaining d_j^2 (initially L_jj), update every
    d_i^2 by the new Cholesky row e = (L_j - c_j^T C) / sqrt(d_j^2), ``visual_token_num`` times.
  - budget: the authors pass a token count (64 / 128 / 192 of LLaVA-1.5's 576); here it is the shared
    ``select``'s ceil(ratio * N_v). The greedy order is prefix-consistent (the first k picks do not depend on
    how many follow), so ``score`` is minus the full pick order and every ratio keeps a prefix of it: computed
    once per prompt, shared by the ratios of an evaluation and timed as its scoring. At one ratio this runs
    N_v greedy steps where the authors run k (measured, one CPU thread: N_v = 576, d = 4096: kernel 0.57 s,
    k = 144 steps 0.09 s, all 576 steps 0.54 s; N_v = 2000: 5.1 s, 0.7 s, 10.3 s).
Differences (the authors' code exists for LLaVA-1.5 / 1.6 only; CDPruner for the other families is not public):
  - relevance inputs: the authors embed the instruction with CLIP's TEXT tower and the tokens with CLIP's
    ``post_layernorm`` + ``visual_projection``; neither is part of a transformers LLaVA checkpoint nor exists for
    Qwen / SigLIP towers, so here both sides are in the LLM's input space: the visual features as scattered
    into ``inputs_embeds`` and the LLM input embeddings of the instruction tokens (``prompt.instruction``).
    With no instruction tokens every relevance is 1 (a plain DPP over the similarity);
  - one DPP over all of a prompt's visual tokens (the authors run one per image / anyres crop, each keeping
    ``visual_token_num``);
  - when the kernel is exhausted (every remaining d^2 <= 1e-10, which needs N_v > the feature dimension) the
    authors' update divides by sqrt(<= 0) (NaN); here the rest follows the relevance order.
Works on every supported family (it reads ``inputs_embeds`` only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register

EXHAUSTED = 1e-10


def conditional_relevance(visual: Tensor, text: Tensor, negate: bool = True) -> Tensor:
    """[N, D] visual features, [M, D] instruction embeddings -> [N] min-max scaled relevance (float32).

    r = mean_m (-cos(v_i, t_m)) (``negate``; the authors' sign), then (r - min + 1e-6) / (max - min).
    M = 0 or a constant r -> all ones."""
    if text.shape[0] == 0:
        return visual.new_ones(visual.shape[0], dtype=torch.float32)
    v = visual.float() / visual.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    rel = (v @ t.T).mean(-1)
    rel = -rel if negate else rel
    span = rel.max() - rel.min()
    if not span > 0:
        return visual.new_ones(visual.shape[0], dtype=torch.float32)
    return (rel - rel.min() + 1e-6) / span


def dpp_kernel(visual: Tensor, relevance: Tensor) -> Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the rows of ``visual`` [N, D]: Tensor[N, N] float32."""
    v = visual.float() / visual.float().norm(dim=-1, keepdim=True)
    return relevance[:, None] * (v @ v.T) * relevance[None, :]


def greedy_map_order(kernel: Tensor, relevance: Tensor, steps: int | None = None) -> Tensor:
    """Fast greedy MAP inference of the DPP with ``kernel`` [N, N]: LongTensor[steps] of picks, in order.

    Once every remaining d^2 <= ``EXHAUSTED`` the rest is taken in descending ``relevance`` (see the module)."""
    n = kernel.shape[0]
    steps = n if steps is None else min(steps, n)
    cis = kernel.new_zeros(steps, n)
    d2 = torch.diagonal(kernel).clone().float()
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order = []
    for i in range(steps):
        j = int(torch.argmax(d2))
        if not float(d2[j]) > EXHAUSTED:
            rest = torch.nonzero(~chosen).flatten()
            rest = rest[torch.argsort(relevance[rest], descending=True, stable=True)]
            order += rest[: steps - i].tolist()
            break
        order.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(d2[j])
        cis[i] = e
        d2 -= e.square()
        d2[j] = float("-inf")
        chosen[j] = True
    return torch.tensor(order, dtype=torch.long)  # on the CPU


@register("cdpruner")
@dataclass
class CDPruner(Pruner):
    """Instruction-conditioned DPP over the visual tokens (greedy MAP); keeps a greedy prefix.

    negate: the authors' sign of the relevance (minus the mean cosine); False uses plus.
    """

    negate: bool = True

    def __post_init__(self) -> None:
        self.text_tokens = 16  # M of the selection cost: the last scored prompt's instruction tokens

    def parts(self, prompt: Prompt) -> tuple[Tensor, Tensor]:
        """(visual features [N_v, D], instruction embeddings [M, D]) of ``prompt``, float32 where the prompt is
        (the DPP runs there: a GPU for long videos)."""
        start, end = prompt.instruction
        embeds = prompt.inputs_embeds[0].detach().float()
        return embeds[prompt.visual_pos], embeds[start:end]

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: minus the greedy MAP pick order (the first pick scores highest)."""
        if prompt.num_visual == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        visual, text = self.parts(prompt)
        self.text_tokens = int(text.shape[0])
        relevance = conditional_relevance(visual, text, self.negate)
        order = greedy_map_order(dpp_kernel(visual, relevance), relevance).cpu()
        scores = torch.empty(prompt.num_visual)
        scores[order] = -torch.arange(prompt.num_visual, dtype=torch.float32)
        return scores

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """Similarity (N^2 d), relevance (N M d), kernel (2 N^2) and k greedy steps (each i N for the Cholesky
        row and N for the update: k^2 N / 2 + k N), k = the kept tokens."""
        k = tokens_per_layer[0] if tokens_per_layer else n_visual
        n = n_visual
        return n * n * d + n * self.text_tokens * d + 2 * n * n + k * k * n // 2 + k * n
