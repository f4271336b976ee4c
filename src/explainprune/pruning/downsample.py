"""``downsample``: the same media at a lower resolution, so that the model makes about ``ratio`` of the visual
tokens itself -- the resolution baseline several 2025 token-pruning benchmarks found hard to beat. No token is
selected: the prompt is prepared again from the media, resized, and the unchanged model runs on it.

How ``ratio`` maps to tokens: each image, and each video frame, whose LLM token grid is R x C (after the
patch merger) is resized to R' x C' grid cells of ``patch_size * merge_size`` pixels, with R' in
{floor, ceil}(R sqrt(ratio)) and C' in {floor, ceil}(C sqrt(ratio)) (clamped to 1..R, 1..C): of those four,
the grid with the most tokens not above ceil(ratio * R * C) (on a tie the one closest to the original aspect
ratio). The media are resized from the original pixels in one step (the processor's resampling filter) and the
processor is told to keep that size (its min / max pixels are widened for the call, on a copy: the model's
own processor is untouched). Every video frame is kept (the temporal grid does not change); positions are the
ones the model computes for the smaller media (Qwen2.5-VL / Qwen3-VL: the same time spacing).
Families: those with dynamic resolution, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and MoE). LLaVA-1.5 (576 tokens for
any image) and LLaVA-OneVision (its 27 x 27 base view is always there, its video frames are resized to a fixed
size: the count does not follow the resolution) raise a ValueError saying so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from explainprune.models.base import VLM, GenerationResult, Prompt, Video, to_pil
from explainprune.pruning.base import Pruner, _as_ratio, register, select

SUPPORTED = ("qwen2_vl", "qwen3_vl")


def target_grid(rows: int, cols: int, ratio: float) -> tuple[int, int]:
    """The smaller token grid (rows', cols') for a ``rows`` x ``cols`` grid at ``ratio`` (see the module)."""
    budget = max(1, math.ceil(float(ratio) * rows * cols - 1e-9))
    s = math.sqrt(float(ratio))
    cands = {(min(max(a, 1), rows), min(max(b, 1), cols))
             for a in (math.floor(rows * s), math.ceil(rows * s)) for b in (math.floor(cols * s), math.ceil(cols * s))}
    fits = [(r, c) for r, c in cands if r * c <= budget] or [(1, 1)]
    return max(fits, key=lambda g: (g[0] * g[1], -abs(math.log(g[0] * cols / (g[1] * rows)))))


def check_family(vlm: VLM) -> None:
    family = getattr(vlm, "family", "")
    if family not in SUPPORTED:
        raise ValueError(
            f"downsample needs a family with dynamic resolution (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); the "
            f"{family or type(vlm).__name__!r} family's token count does not follow the resolution (LLaVA-1.5: a fixed "
            "count per image; LLaVA-OneVision: a fixed 27 x 27 base view and fixed-size video frames). "
            "Use another method")


@contextmanager
def processor_bounds(vlm: VLM, low: int, high: int) -> Iterator[None]:
    """Within the block ``vlm.image_processor`` is a copy whose min / max pixels are ``low`` / ``high`` (the
    instance attribute is swapped back on exit)."""
    original = vlm.image_processor
    proc = copy.copy(original)
    size = original.size
    bounds = {"shortest_edge": low, "longest_edge": high}
    proc.size = {**size, **bounds} if isinstance(size, dict) else dataclasses.replace(size, **bounds)
    vlm.image_processor = proc
    try:
        yield
    finally:
        vlm.image_processor = original


def _media(prompt: Prompt) -> tuple[list[Any], Any]:
    """(images, video or None) the prompt was prepared from."""
    has_video = "pixel_values_videos" in prompt.model_inputs
    images = prompt.media[:-1] if has_video else list(prompt.media)
    return images, (prompt.media[-1] if has_video else None)


def downsampled_prompt(vlm: VLM, prompt: Prompt, ratio: float) -> Prompt:
    """``prompt`` prepared again from its media resized as the module says: Prompt with fewer visual tokens."""
    check_family(vlm)
    if prompt.num_visual == 0:
        raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
    unit = int(vlm.image_processor.patch_size) * int(vlm.image_processor.merge_size)
    merge = int(vlm.image_processor.merge_size)
    images, video = _media(prompt)
    sizes: list[tuple[int, int]] = []

    def smaller(grid: Tensor) -> tuple[int, int]:
        rows, cols = target_grid(int(grid[1]) // merge, int(grid[2]) // merge, ratio)
        sizes.append((rows * unit, cols * unit))
        return cols * unit, rows * unit  # PIL: (width, height)

    grids = prompt.model_inputs.get("image_grid_thw", [])
    new_images = [to_pil(im).resize(smaller(g), resample=vlm.image_processor.resample) for im, g in zip(images, grids)]
    new_video = None
    if video is not None:
        wh = smaller(prompt.model_inputs["video_grid_thw"][0])
        new_video = Video([to_pil(f).resize(wh, resample=vlm.image_processor.resample) for f in video],
                          fps=getattr(video, "fps", None))
        if getattr(video, "timestamps", None) is not None:
            new_video.timestamps = video.timestamps
    areas = [h * w for h, w in sizes]
    with processor_bounds(vlm, min(areas), max(areas)):
        return vlm.prepare(images=new_images or None, video=new_video, question=prompt.question)


@register("downsample")
@dataclass
class Downsample(Pruner):
    """The media at a lower resolution (about ``ratio`` of the tokens); no token selection."""

    count_from_media: ClassVar[bool] = True  # the count follows each image's resized grid

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        raise ValueError("downsample does not rank the visual tokens: it prepares the media again at a lower "
                         "resolution (use generate)")

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        raise ValueError("downsample keeps no subset of the visual tokens: it prepares the media again at a lower "
                         "resolution (use generate)")

    def prompt(self, vlm: VLM, prompt: Prompt, ratio: float) -> Prompt:
        """The downsampled Prompt (ratio checked as the shared ``select`` checks it)."""
        ratio = _as_ratio(ratio)
        select(torch.ones(1), ratio)
        return downsampled_prompt(vlm, prompt, float(ratio))

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generation on the downsampled prompt(s), all tokens kept; a list runs as one left-padded batch.
        ``visual_tokens`` of the result is the downsampled count."""
        if isinstance(prompt, Prompt):
            return vlm.generate(self.prompt(vlm, prompt, ratio), max_new_tokens=max_new_tokens, **kwargs)
        return vlm.generate([self.prompt(vlm, p, ratio) for p in prompt], max_new_tokens=max_new_tokens, **kwargs)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """0: nothing is selected (the resize is image work, and the vision encoder, not counted for any method,
        runs on fewer patches)."""
        return 0
