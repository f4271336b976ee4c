"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"): before the LLM, keep DOMINANT tokens (most attended in the vision encoder) and merge the rest
into a few CONTEXTUAL tokens by key similarity. Training-free.

Followed: the paper's method and the authors' ``CLIPVisionTower_VisionZip.forward``
(``visionzip/clip_encoder.py``, read, not copied):
  - dominant: with a CLS token (LLaVA's CLIP), the CLS row of the attention in the layer the features
    come from (``vision_feature_layer``, -2), summed over heads; without one (Qwen2-VL / Qwen2.5-VL,
    for which the authors have a Qwen2.5-VL variant whose code was not available here: this is this
    implementation's reading), the attention each patch RECEIVES in the encoder's last block
    (mean over heads and queries, within each image / frame), averaged over the merger's patch group so
    that there is one score per LLM token;
  - contextual: among the other tokens, ``contextual`` targets taken uniformly (every step-th), every
    remaining token joins the target whose key (mean over heads, same layer) is most cosine-similar.
Authors' defaults: dominant 54 + contextual 10 of 64 (108 + 20 of 128, 162 + 30 of 192), i.e. a
contextual share of 10/64 of the kept tokens; that share is the default here. On LLaVA the authors'
``visionzip(model, dominant, contextual)`` passes ``dominant - 1`` patches to the tower and the CLS token
fills the last dominant slot (``all_indices`` = CLS + top patches): ``cls_slot=True`` (default) follows
that, one patch fewer is dominant (the LLM here receives patch tokens only, so it sees kept - 1 tokens);
``cls_slot=False`` gives every dominant slot to a patch.

Choices of this implementation (documented, tested):
  - merging happens on the features as the LLM receives them (after the projector / merger), not
    before the projector: a merged token is the MEAN of its group (target + assigned tokens); the authors'
    code adds target + mean(assigned) before the projector;
  - a merged token takes the sequence slot and ORIGINAL position id of its target token (Qwen2-VL:
    its (t, h, w) M-RoPE position), so the kept tokens stay in sequence order;
  - one selection over all the prompt's visual tokens (images and frames together).
Not supported: LLaVA-OneVision (its anyres tiles, unpadding and newline tokens have no one-to-one map
from encoder patches to LLM tokens) and Qwen3-VL / Qwen3-VL-MoE (their DeepStack features, added inside
the LLM at the visual rows, would have to be merged too); both raise a ValueError saying so.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.pruning.base import Pruner, register, select

DEFAULT_CONTEXTUAL_SHARE = 10 / 64


@dataclass
class ZipPlan:
    """One VisionZip selection: sorted kept visual indices, and for each merged target its group.

    keep     LongTensor[k]            dominant + contextual targets, sorted
    groups   dict[int, LongTensor]    target index -> indices merged into it (target included)
    """

    keep: Tensor
    groups: dict[int, Tensor]


def visionzip_plan(attention: Tensor, keys: Tensor, kept: int, contextual: int, reserved: int = 0) -> ZipPlan:
    """Dominant + contextual selection on one prompt.

    attention Tensor[N] (dominance score), keys Tensor[N, d_k]; ``kept`` slots of which ``contextual`` are
    merged targets (clamped to what remains) and ``reserved`` dominant slots go to a token that is not
    among the N (LLaVA's CLS): kept - contextual - reserved tokens are dominant (at least 1).
    """
    n = attention.numel()
    kept = min(max(kept, 1), n)
    contextual = min(max(contextual, 0), kept - 1) if kept > 1 else 0
    dominant = torch.topk(attention.float(), max(1, kept - contextual - reserved)).indices
    rest = torch.ones(n, dtype=torch.bool)
    rest[dominant] = False
    remaining = torch.nonzero(rest).flatten()
    contextual = min(contextual, len(remaining))
    groups: dict[int, Tensor] = {}
    targets = remaining[:0]
    if contextual > 0:
        step = max(1, len(remaining) // contextual)
        pick = torch.arange(0, len(remaining), step)[:contextual]
        targets = remaining[pick]
        others = remaining[~torch.isin(remaining, targets)]
        if len(others):
            k = F.normalize(keys.float(), dim=-1)
            assign = (k[others] @ k[targets].T).argmax(1)
        for j, t in enumerate(targets.tolist()):
            members = others[assign == j] if len(others) else others
            groups[t] = torch.cat([torch.tensor([t]), members])
    keep = torch.sort(torch.cat([dominant, targets])).values
    return ZipPlan(keep=keep, groups=groups)


def merged_prompt(prompt: Prompt, plan: ZipPlan) -> Prompt:
    """The prompt with each target's feature replaced by the mean of its group (same slot, same position)."""
    embeds = prompt.inputs_embeds.clone()
    for t, members in plan.groups.items():
        rows = prompt.visual_pos[members].to(embeds.device)
        embeds[0, prompt.visual_pos[t]] = embeds[0, rows].float().mean(0).to(embeds.dtype)
    return dataclasses.replace(prompt, inputs_embeds=embeds)


# -- the vision encoder's attention and keys, per family -------------------------------------------------
BLOCK_BYTES = 1 << 28  # float32 attention rows held at once by ``received_attention`` (256 MiB)


def received_attention(q: Tensor, k: Tensor, scaling: float, block_bytes: int = BLOCK_BYTES) -> Tensor:
    """The attention each token RECEIVES in one softmax attention: mean over heads and queries of
    softmax(q k^T * scaling) (rows over the keys). q, k: [S, H, d] (one image / frame window) -> [S] float32.

    Computed in query blocks of ``block_bytes`` of float32 logits (at least one query row), so memory is
    linear in S: the whole map [H, S, S] is ~3.4 GB at 1,296 merged tokens (S = 5,184 patches, 16 heads),
    ~68 GB at 5,776 and ~460 GB at 15K; blocks keep it at ``block_bytes`` + O(S)."""
    s, h = q.shape[0], q.shape[1]
    rows = max(1, block_bytes // (4 * h * s))
    kf = k.float()
    total = torch.zeros(s, dtype=torch.float32, device=q.device)
    for start in range(0, s, rows):
        logits = torch.einsum("qhd,khd->hqk", q[start:start + rows].float(), kf) * scaling
        total += torch.softmax(logits, -1).sum((0, 1))
        del logits
    return total / (h * s)


def _rope_vision(attn: Any) -> Any:
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision


def _qwen_pass(vlm: VLM, pixels: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """(received attention [tokens], keys [tokens, hd]) of one Qwen2-VL / 2.5-VL visual call, LLM token order."""
    visual = vlm.model.model.visual
    block = visual.blocks[-1]
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["cu"], seen["pe"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

    handle = block.attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        visual(pixels.to(vlm.device, dtype=visual.dtype), grid_thw=grid.to(vlm.device))
    finally:
        handle.remove()
    attn, h = block.attn, seen["h"]
    s = h.shape[0]
    q, k, _ = attn.qkv(h).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, hd]
    raw_keys = k.float().mean(1)                                                           # [S, hd]
    cos, sin = seen["pe"]
    q, k = _rope_vision(attn)(q, k, cos, sin)
    received = torch.zeros(s, dtype=torch.float32, device=h.device)
    cu = seen["cu"].tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        received[a:b] = received_attention(q[a:b], k[a:b], attn.scaling)
    unit = int(visual.spatial_merge_size) ** 2
    scores, keys = received.view(-1, unit).mean(1), raw_keys.view(-1, unit, raw_keys.shape[-1]).mean(1)
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: blocks run in window order
        module = sys.modules[type(visual).__module__]
        window_index, _ = module.get_vision_window_index(
            grid.to(vlm.device), spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size, kwargs={})
        reverse = torch.argsort(window_index.to(scores.device))
        scores, keys = scores[reverse], keys[reverse]
    return scores.cpu(), keys.cpu()


def _clip_pass(vlm: VLM, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS attention [images * P], keys [images * P, hd]) of LLaVA's CLIP at ``vision_feature_layer``."""
    cfg = vlm.config
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError("visionzip on LLaVA needs the CLS token dropped from the features "
                         f"(vision_feature_select_strategy 'default'); got {cfg.vision_feature_select_strategy!r}")
    tower = vlm.model.model.vision_tower
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    layer = encoder.layers[cfg.vision_feature_layer]
    seen: dict[str, Tensor] = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tower(pixels.to(vlm.device, dtype=vlm.model.dtype), output_hidden_states=True)
    finally:
        handle.remove()
    attn, h = layer.self_attn, seen["h"]
    b, n, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(b, 1, attn.num_heads, -1)
    k = attn.k_proj(h).view(b, n, attn.num_heads, -1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * attn.scale
    cls = torch.softmax(logits, -1)[:, :, 0, 1:].sum(1)            # [B, P]: summed over heads, as the authors
    keys = k[:, 1:].float().mean(2)                                  # [B, P, hd]
    return cls.reshape(-1).cpu(), keys.reshape(-1, keys.shape[-1]).cpu()


def vision_scores(vlm: VLM, prompt: Prompt) -> tuple[Tensor, Tensor]:
    """(dominance score [N_v], keys [N_v, d_k]) from the vision encoder, in the prompt's visual order."""
    inputs = prompt.model_inputs
    family = getattr(vlm, "family", "")
    with torch.no_grad():
        if family == "qwen2_vl":
            parts = []
            if "pixel_values" in inputs:
                parts.append(_qwen_pass(vlm, inputs["pixel_values"], inputs["image_grid_thw"]))
            if "pixel_values_videos" in inputs:
                parts.append(_qwen_pass(vlm, inputs["pixel_values_videos"], inputs["video_grid_thw"]))
            scores, keys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        elif family == "llava":
            scores, keys = _clip_pass(vlm, inputs["pixel_values"])
        else:
            raise ValueError(f"visionzip does not support the {family or type(vlm).__name__!r} family (supported: "
                             "Qwen2-VL, Qwen2.5-VL, LLaVA). LLaVA-OneVision's anyres tiles and newline tokens have no "
                             "one-to-one map from encoder patches to LLM tokens; Qwen3-VL's DeepStack features from "
                             "several encoder layers would have to be merged too. Use another method for it")
    if len(scores) != prompt.num_visual:  # pragma: no cover - defensive
        raise RuntimeError(f"visionzip got {len(scores)} encoder scores for {prompt.num_visual} visual tokens")
    return scores, keys


@register("visionzip")
@dataclass
class VisionZip(Pruner):
    """Dominant tokens by vision-encoder attention + contextual tokens merged by key similarity.

    contextual_share: share of the kept tokens that are merged contextual tokens (authors: 10/64);
    cls_slot: on LLaVA the CLS token takes one dominant slot, as in the authors' code (one patch fewer kept).
    """

    contextual_share: float = DEFAULT_CONTEXTUAL_SHARE
    cls_slot: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.contextual_share) < 1.0:
            raise ValueError(f"visionzip contextual_share must be in [0, 1); got {self.contextual_share}")
        self._memo: tuple[Any, tuple[Tensor, Tensor]] | None = None
        self._key_dim = 0

    def _analyse(self, vlm: VLM, prompt: Prompt) -> tuple[Tensor, Tensor]:
        if self._memo is None or self._memo[0] is not prompt:
            self._memo = (prompt, vision_scores(vlm, prompt))
        self._key_dim = int(self._memo[1][1].shape[-1])
        return self._memo[1]

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: the dominance score (CLS attention, or attention received)."""
        return self._analyse(vlm, prompt)[0]

    def plan(self, vlm: VLM, prompt: Prompt, ratio: float) -> ZipPlan:
        if prompt.num_visual == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        kept = len(select(torch.ones(prompt.num_visual), ratio))
        scores = self.score(vlm, prompt)
        _, keys = self._analyse(vlm, prompt)
        reserved = 1 if self.cls_slot and getattr(vlm, "family", "") == "llava" else 0  # the CLS's slot
        return visionzip_plan(scores, keys, kept, round(kept * float(self.contextual_share)), reserved)

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        return self.plan(vlm, prompt, ratio).keep

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generation on the merged prompt(s); a list runs as one left-padded (ragged) batch."""
        if isinstance(prompt, Prompt):
            plan = self.plan(vlm, prompt, ratio)
            return vlm.generate(merged_prompt(prompt, plan), keep=plan.keep, max_new_tokens=max_new_tokens, **kwargs)
        plans = [self.plan(vlm, p, ratio) for p in prompt]
        return vlm.generate([merged_prompt(p, z) for p, z in zip(prompt, plans)], keep=[z.keep for z in plans],
                            max_new_tokens=max_new_tokens, **kwargs)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int], key_dim: int | None = None) -> int:
        """Key similarity of the merged tokens to the targets ((N - k) c d_k) plus their means (N d); d_k is
        ``key_dim``, else the key dim of the last analysed prompt.

        The dominance attention is the encoder's own (computed anyway), so it is not counted."""
        kept = tokens_per_layer[0] if tokens_per_layer else n_visual
        c = round(kept * float(self.contextual_share))
        return max(n_visual - kept, 0) * c * max(key_dim or self._key_dim, 1) + n_visual * d

    def selection_flops(self, shape: Any, n_visual: int, tokens_per_layer: list[int]) -> int:
        """``overhead_flops`` with d_k the vision encoder's head dim from the model's config when known."""
        return self.overhead_flops(shape.hidden, n_visual, tokens_per_layer, shape.vision_head_dim)

