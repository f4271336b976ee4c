"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More"): keep the visual tokens LEAST duplicated with a few pivot tokens, inside the LLM at layer K.

Followed: the paper's method and the authors' ``get_retained_image_token`` (Qwen2-VL variant,
``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``), read, not copied:
  1. before layer K, pivots are the ``pivot_image`` visual tokens and the ``pivot_text`` text tokens after
     the image with the largest L1 norm of layer K-1's key states (heads concatenated; here the k_proj
     output, i.e. before RoPE, which rotates pairs and would change L1 norms by position);
  2. token features are the hidden states entering layer K passed through the model's final norm;
  3. for each pivot in turn, the remaining visual tokens with the LOWEST cosine similarity to it are kept
     (its quota), and removed from the candidates; the image pivots are kept too.
Authors' defaults: K = 2, 4 image pivots, 4 text pivots. The authors give every pivot
int(N_v * keep / 8) tokens on top of the image pivots; here the quotas split exactly
ceil(ratio * N_v) - (image pivots) over the pivots (the first ones get the remainder), so DART keeps
exactly what the other methods keep. Pivots are visited image pivots first, then text pivots, each by
decreasing norm (the authors iterate a Python set, whose order is arbitrary).
Works on every supported family (tested on all six of ``testing.FAMILIES``, Qwen3-VL DeepStack rows
following the kept tokens); ragged batches; the KV cache of layers >= K holds only the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainprune.attention import module_device
from explainprune.cost import kept_count
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register, select
from explainprune.pruning.inllm import InLLMResult, SetInLLM, Stage, StageContext, generate_inllm


def quotas(total: int, pivots: int) -> list[int]:
    """``total`` split over ``pivots`` as evenly as possible, the first ones taking the remainder."""
    base, extra = divmod(max(total, 0), max(pivots, 1))
    return [base + (i < extra) for i in range(pivots)]


def duplication_select(features: Tensor, pivot_features: Tensor, image_pivots: Tensor, budget: int) -> Tensor:
    """DART's selection on one prompt: sorted indices (into the N visual tokens) of the ``budget`` kept.

    features [N, D] visual-token features; pivot_features [P, D] the pivots' features in visiting order;
    image_pivots LongTensor[p_i] visual indices that are pivots (kept, never candidates).
    """
    n = features.shape[0]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[image_pivots] = True
    feats = features.float()
    for pivot, quota in zip(pivot_features.float(), quotas(budget - int(kept.sum()), len(pivot_features))):
        candidates = torch.nonzero(~kept).flatten()
        quota = min(quota, len(candidates))
        if quota <= 0:
            continue
        sim = F.cosine_similarity(pivot[None], feats[candidates], dim=-1)
        kept[candidates[torch.topk(-sim, quota).indices]] = True
    # if a pivot list was empty the budget may be short: fill with the least duplicated of the first pivot
    short = budget - int(kept.sum())
    if short > 0:
        candidates = torch.nonzero(~kept).flatten()
        ref = pivot_features[0].float() if len(pivot_features) else feats.mean(0)
        sim = F.cosine_similarity(ref[None], feats[candidates], dim=-1)
        kept[candidates[torch.topk(-sim, short).indices]] = True
    return torch.nonzero(kept).flatten()


def dart_stage(ratio: float, layer: int, pivot_image: int, pivot_text: int) -> Stage:
    def choose(ctx: StageContext) -> list[Tensor]:
        keys = ctx.previous["k"]                                              # [B, Lc, H_kv * hd]
        attn = ctx.previous["attn"]
        if hasattr(attn, "k_norm"):  # Qwen3-style per-head key norm: the key states the layer uses
            keys = attn.k_norm(keys.view(*keys.shape[:2], -1, attn.head_dim)).flatten(2)
        l1 = keys.float().abs().sum(-1).cpu()                                 # [B, Lc]
        norm = ctx.vlm.language_model.norm                                    # may sit on another device
        feats = norm(ctx.hidden.to(module_device(norm))).float().cpu()        # [B, Lc, D]
        out = []
        for b, (rows, text, k) in enumerate(zip(ctx.visual_rows, ctx.text_rows, ctx.budgets)):
            rows, text = rows.cpu(), text.cpu()
            n_img = min(pivot_image, k, len(rows))
            img_piv = torch.topk(l1[b, rows], n_img).indices if n_img else torch.zeros(0, dtype=torch.long)
            img_piv = img_piv[torch.argsort(-l1[b, rows][img_piv], stable=True)]
            n_txt = min(pivot_text, len(text))
            txt_piv = text[torch.topk(l1[b, text], n_txt).indices] if n_txt else torch.zeros(0, dtype=torch.long)
            txt_piv = txt_piv[torch.argsort(-l1[b, txt_piv], stable=True)]
            pivots = torch.cat([rows[img_piv], txt_piv])
            out.append(duplication_select(feats[b, rows], feats[b, pivots], img_piv, k))
        return out

    return Stage(layer=layer, count=lambda n: kept_count(n, ratio), choose=choose)


@register("dart")
@dataclass
class DART(SetInLLM, Pruner):
    """DART at layer ``layer`` = K (authors' default 2) with ``pivot_image`` / ``pivot_text`` pivots (4 / 4)."""

    layer: int = 2  # type: ignore[misc]  # overrides the ClassVar default: the layer it prunes at
    pivot_image: int = 4
    pivot_text: int = 4

    def __post_init__(self) -> None:
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text == 0:
            raise ValueError("dart needs pivot_image >= 0, pivot_text >= 0 and at least one pivot")

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        raise NotImplementedError("dart selects a set (not a ranking) inside the LLM: use keep or generate")

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> InLLMResult | list[InLLMResult]:
        select(torch.ones(1), ratio)  # validates the ratio before any work
        stages = self.schedule(len(vlm.language_model.layers), ratio)
        return generate_inllm(vlm, prompt, stages, max_new_tokens, capture_previous=True, **kwargs)

    def schedule(self, num_layers: int, ratio: float) -> list[Stage]:
        """DART's one stage at ``layer`` (also what ``tokens_per_layer`` counts)."""
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"dart layer must be in 1..{num_layers - 1} for a {num_layers}-layer LLM; "
                             f"got {self.layer}")
        return [dart_stage(ratio, self.layer, self.pivot_image, self.pivot_text)]

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """Key L1 norms (n d) and one cosine similarity per pivot over the candidates (P n d, upper bound)."""
        n = tokens_per_layer[self.layer - 1] if tokens_per_layer else n_visual
        return n * d + (self.pivot_image + self.pivot_text) * n * d
