"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More"): keep the visual tokens LEAST duplicated with a few pivot tokens, inside the LLM at layer K.

Followed: the paper's method and the authors' ``DART.get_retained_image_token`` (Qwen2-VL variant,
``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`` of the DART code), read, not copied:
  1. before layer K, pivots are the ``pivot_image`` visual tokens and the ``pivot_text`` tokens after the
     image with the largest L1 norm of layer K-1's key states as its attention returns them: AFTER RoPE
     (heads concatenated; Qwen3's per-head k_norm first). ``keys="raw"`` ranks the k_proj output instead;
  2. token features are the hidden states entering layer K passed through the model's final norm;
  3. pivots are visited in the authors' order, ``list(set(image_pivots + text_pivots))`` of their
     sequence indices (CPython's set order of small ints: deterministic; ``order="norm"``: image pivots
     then text pivots, each by decreasing norm); for each, the remaining visual tokens with the LOWEST
     cosine similarity to it are kept (its quota) and removed from the candidates; image pivots are kept.
Authors' defaults: K = 2, 4 image pivots, 4 text pivots; ``budget="authors"`` keeps their count,
pivot_image + P * int(N_v * ratio / P) with P = pivot_image + pivot_text (every pivot's quota
int(N_v * ratio / P)); ``budget="exact"`` keeps ceil(ratio * N_v) as the other methods, the quotas split
evenly (the first pivots take the remainder). ``tokens_per_layer`` gives the count per layer.
Works on every supported family (tested on all six of ``testing.FAMILIES``, Qwen3-VL DeepStack rows
following the kept tokens); ragged batches; the KV cache of layers >= K holds only the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainprune.attention import apply_rope, module_device
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


def dart_budget(n_visual: int, ratio: float, pivot_image: int, pivot_text: int, budget: str = "authors") -> int:
    """Visual tokens DART keeps: the authors' pivot_image + P * int(N_v ratio / P), or ceil(ratio N_v)."""
    if budget == "exact":
        return kept_count(n_visual, ratio)
    p = pivot_image + pivot_text
    return min(n_visual, max(1, min(pivot_image, n_visual) + p * int(n_visual * float(ratio) / p + 1e-9)))


def key_l1(keys: Tensor, attn: Any, rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """L1 norm of each token's key states [B, L] (heads concatenated): the k_proj output ``keys``
    [B, L, H_kv * hd] after Qwen3's k_norm and, with ``rope`` (cos, sin [B, L, hd]), rotated as the layer does."""
    b, n = keys.shape[:2]
    keys = keys.view(b, n, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3-style per-head key norm, before RoPE as in the attention's forward
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)                                               # [B, H_kv, L, hd]
    if rope is not None:
        cos, sin = (t.to(keys.device) for t in rope)
        keys = apply_rope(attn, keys, cos, sin)
    return keys.float().abs().sum((1, 3))


def visiting_order(image_seq: list[int], text_seq: list[int], order: str = "authors") -> list[int]:
    """Positions (into image_seq + text_seq) in the order the pivots are visited: the authors iterate
    ``list(set(image_seq + text_seq))`` (sequence indices); "norm" keeps the given order."""
    both = image_seq + text_seq
    if order == "norm":
        return list(range(len(both)))
    where = {idx: i for i, idx in reversed(list(enumerate(both)))}
    return [where[idx] for idx in list(set(both))]


def dart_stage(ratio: float, layer: int, pivot_image: int, pivot_text: int, budget: str = "authors",
               keys: str = "rope", order: str = "authors") -> Stage:
    def choose(ctx: StageContext) -> list[Tensor]:
        attn = ctx.previous["attn"]
        l1 = key_l1(ctx.previous["k"], attn, ctx.previous["rope"] if keys == "rope" else None).cpu()  # [B, Lc]
        norm = ctx.vlm.language_model.norm                                    # may sit on another device
        feats = norm(ctx.hidden.to(module_device(norm))).float().cpu()        # [B, Lc, D]
        out = []
        for b, (rows, text, k) in enumerate(zip(ctx.visual_rows, ctx.text_rows, ctx.budgets)):
            rows, text = rows.cpu(), text.cpu()
            pad = int((~ctx.valid[b]).sum())
            n_img = min(pivot_image, k, len(rows))
            img_piv = torch.topk(l1[b, rows], n_img).indices if n_img else torch.zeros(0, dtype=torch.long)
            n_txt = min(pivot_text, len(text))
            txt_piv = text[torch.topk(l1[b, text], n_txt).indices] if n_txt else torch.zeros(0, dtype=torch.long)
            pivots = torch.cat([rows[img_piv], txt_piv])
            visit = visiting_order((rows[img_piv] - pad).tolist(), (txt_piv - pad).tolist(), order)
            out.append(duplication_select(feats[b, rows], feats[b, pivots[visit]], img_piv, k))
        return out

    return Stage(layer=layer, count=lambda n: dart_budget(n, ratio, pivot_image, pivot_text, budget), choose=choose)


@register("dart")
@dataclass
class DART(SetInLLM, Pruner):
    """DART at layer ``layer`` = K (authors' default 2) with ``pivot_image`` / ``pivot_text`` pivots (4 / 4).

    budget: "authors" | "exact"; keys: "rope" (authors: L1 after RoPE) | "raw"; order: "authors" | "norm".
    """

    layer: int = 2  # type: ignore[misc]  # overrides the ClassVar default: the layer it prunes at
    pivot_image: int = 4
    pivot_text: int = 4
    budget: str = "authors"
    keys: str = "rope"
    order: str = "authors"

    def __post_init__(self) -> None:
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text == 0:
            raise ValueError("dart needs pivot_image >= 0, pivot_text >= 0 and at least one pivot")
        for name, value, allowed in (("budget", self.budget, ("authors", "exact")),
                                     ("keys", self.keys, ("rope", "raw")), ("order", self.order, ("authors", "norm"))):
            if value not in allowed:
                raise ValueError(f"dart {name} must be one of {', '.join(allowed)}; got {value!r}")

    def tokens_per_layer(self, n_visual: int, ratio: float, num_layers: int) -> list[int]:
        """Visual tokens each LLM layer sees at ``ratio`` (what ``InLLMResult.visual_per_layer`` reports)."""
        kept = dart_budget(n_visual, ratio, self.pivot_image, self.pivot_text, self.budget)
        return [n_visual] * self.layer + [kept] * (num_layers - self.layer)

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        raise NotImplementedError("dart selects a set (not a ranking) inside the LLM: use keep or generate")

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> InLLMResult | list[InLLMResult]:
        select(torch.ones(1), ratio)  # validates the ratio before any work
        n_layers = len(vlm.language_model.layers)
        if not 1 <= self.layer < n_layers:
            raise ValueError(f"dart layer must be in 1..{n_layers - 1} for a {n_layers}-layer LLM; got {self.layer}")
        stage = dart_stage(ratio, self.layer, self.pivot_image, self.pivot_text, self.budget, self.keys, self.order)
        return generate_inllm(vlm, prompt, [stage], max_new_tokens, capture_previous=True, **kwargs)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """Key L1 norms (n d) and one cosine similarity per pivot over the candidates (P n d, upper bound)."""
        n = tokens_per_layer[self.layer - 1] if tokens_per_layer else n_visual
        return n * d + (self.pivot_image + self.pivot_text) * n * d
