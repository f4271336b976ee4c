"""EVS, Efficient Video Sampling (NVIDIA; as vLLM ships it for Qwen2.5-VL / Qwen3-VL video): before the LLM,
drop the video tokens most similar to the token at the same place in the previous frame; the first frame is
always kept. Training-free, videos only.

Followed (read, not copied): ``compute_retention_mask`` and ``compute_retained_tokens_count`` in
``vllm/multimodal/evs.py`` of github.com/vllm-project/vllm:
  - on the video's features as the LLM receives them (after the merger), laid out (T, H, W) in temporal
    tokens T (Qwen: one per ``temporal_patch_size`` frames);
  - dissimilarity of token (t, h, w) = 1 - cos(x[t, h, w], x[t-1, h, w]); the first frame gets 255 (kept);
  - the tokens are ranked by dissimilarity, descending, stable (ties keep the (t, h, w) order), and the first
    ``max(H * W, int(T * H * W * (1 - q)))`` are kept, q = vLLM's ``video_pruning_rate`` = 1 - ratio here
    (so a ratio keeps int(ratio * N_video) tokens, floored as vLLM floors, never less than one frame);
  - kept tokens keep their original (t, h, w) M-RoPE positions (vLLM recomputes them to the same values).
Here also: image tokens of a prompt that holds images AND a video are all kept (vLLM applies EVS to videos
only); LLaVA-OneVision videos (a frame grid per frame, one newline token at the end, always kept) are served
the same way. A prompt with no video raises ``NotApplicable`` (``explainprune eval`` marks it n/a);
LLaVA-1.5 (no video input: frames are separate images) raises a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from explainprune.errors import NotApplicable
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, _as_ratio, register, select

FIRST_FRAME = 255.0  # vLLM's dissimilarity of the first frame's tokens (above any 1 - cos)


def retained_count(tokens_per_frame: int, frames: int, ratio: float) -> int:
    """vLLM's budget: max(one frame, int(total * (1 - q))) with q = 1 - ratio."""
    q = 1.0 - float(ratio)
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def frame_dissimilarity(video: Tensor) -> Tensor:
    """[T, H, W, D] -> [T, H, W]: 1 - cos with the same place one frame earlier; 255 on the first frame."""
    sim = torch.nn.functional.cosine_similarity(video[1:].float(), video[:-1].float(), dim=-1)
    return torch.cat([torch.full_like(video[:1, ..., 0].float(), FIRST_FRAME), 1 - sim], 0)


def evs_mask(video: Tensor, ratio: float) -> Tensor:
    """[T, H, W, D] -> BoolTensor[T * H * W] (flattened t, h, w): the tokens EVS keeps at ``ratio``."""
    t, h, w = video.shape[:3]
    return retention_mask(frame_dissimilarity(video).reshape(-1), h * w, ratio)


def retention_mask(dissimilarity: Tensor, tokens_per_frame: int, ratio: float) -> Tensor:
    """[T * H * W] dissimilarities (flattened t, h, w) -> BoolTensor: the top ``retained_count``, stable order."""
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    mask = torch.zeros(dissimilarity.numel(), dtype=torch.bool)
    mask[order[: retained_count(tokens_per_frame, dissimilarity.numel() // tokens_per_frame, ratio)]] = True
    return mask


def video_tokens(vlm: VLM, prompt: Prompt) -> Tensor:
    """BoolTensor[N_v]: which visual tokens belong to the video (by the family's video token id)."""
    cfg = vlm.config
    token = getattr(cfg, "video_token_id", None)
    token = getattr(cfg, "video_token_index", None) if token is None else token
    if token is None:
        family = getattr(vlm, "family", "") or type(vlm).__name__
        raise ValueError(f"evs needs a model with video input; the {family!r} "
                         "family takes a video as separate images (supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
                         "LLaVA-OneVision). Use another method")
    return prompt.input_ids[0, prompt.visual_pos] == token


def _video_layout(prompt: Prompt, is_video: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(visual indices of the video's on-grid tokens in (t, h, w) order, (T, H, W))."""
    idx = torch.nonzero(is_video & (prompt.visual_grid[:, 1] >= 0)).flatten()
    g = prompt.visual_grid[idx]
    frames, rows, cols = (int(torch.unique(g[:, k]).numel()) for k in range(3))
    key = (g[:, 0] - g[:, 0].min()) * rows * cols + g[:, 1] * cols + g[:, 2]
    if frames * rows * cols != len(idx) or torch.unique(key).numel() != len(idx):  # pragma: no cover - defensive
        raise RuntimeError("evs: the video tokens do not form a frames x rows x columns grid")
    return idx[torch.argsort(key)], (frames, rows, cols)


@register("evs")
@dataclass
class EVS(Pruner):
    """Keeps the video tokens that changed most since the previous frame (first frame kept)."""

    count_from_media: ClassVar[bool] = True  # vLLM's floor of one frame depends on the tokens per frame

    def _parts(self, vlm: VLM, prompt: Prompt) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        if prompt.num_visual == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        is_video = video_tokens(vlm, prompt)
        if not bool(is_video.any()):
            raise NotApplicable("evs prunes videos only (redundancy between consecutive frames); this prompt has no "
                                "video. Use another method for images")
        idx, thw = _video_layout(prompt, is_video)
        return is_video, idx, thw

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: the dissimilarity to the previous frame (255 on the first frame; images and off-grid
        tokens, always kept, score 256)."""
        _, idx, (t, h, w) = self._parts(vlm, prompt)
        feats = prompt.inputs_embeds[0, prompt.visual_pos[idx]].detach().cpu()
        scores = torch.full((prompt.num_visual,), FIRST_FRAME + 1)
        scores[idx] = frame_dissimilarity(feats.reshape(t, h, w, -1)).reshape(-1)
        return scores

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        """Every image / off-grid token, and the video tokens ``evs_mask`` keeps (vLLM's budget)."""
        ratio = _as_ratio(ratio)
        select(torch.ones(1), ratio)  # validates the ratio
        _, idx, (t, h, w) = self._parts(vlm, prompt)
        kept = torch.ones(prompt.num_visual, dtype=torch.bool)
        kept[idx] = retention_mask(self.score(vlm, prompt)[idx], h * w, float(ratio))  # score: shared, timed
        return torch.nonzero(kept).flatten()

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """Cosine of each token with its predecessor (3 d per token: a dot product and two norms)."""
        return 3 * n_visual * d
