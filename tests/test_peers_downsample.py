"""``downsample``: the media resized by hand and prepared by a model loaded with relaxed processor bounds is
exactly what the pruner runs, on every dynamic-resolution family; the grid rule; refusals elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import explainprune
from explainprune import get_pruner
from explainprune.models.base import Video
from explainprune.pruning.downsample import target_grid
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"
DYNAMIC = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def expected_grid(rows: int, cols: int, ratio: float) -> tuple[int, int]:
    """Written out: every grid whose sides are within one cell of rows*sqrt(r), cols*sqrt(r) (at least 1), with
    at most ceil(r*rows*cols) cells; the largest, then the one whose aspect ratio is closest to the original."""
    budget = math.ceil(ratio * rows * cols - 1e-9)
    best = None
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            near = (abs(r - rows * math.sqrt(ratio)) < 1 or r == 1) and (abs(c - cols * math.sqrt(ratio)) < 1 or c == 1)
            if near and r * c <= budget:
                key = (r * c, -abs(math.log((r / c) / (rows / cols))))
                if best is None or key > best[0]:
                    best = (key, (r, c))
    return best[1]


def test_target_grid_hand_made_and_exhaustive():
    assert target_grid(8, 10, 0.25) == (4, 5)
    assert target_grid(4, 5, 0.1) == (1, 2)  # 2 cells; 1 x 2 is closer to 4:5 than 2 x 1
    assert target_grid(3, 3, 1.0) == (3, 3) and target_grid(1, 1, 0.1) == (1, 1)
    for rows in range(1, 13):
        for cols in range(1, 13):
            for ratio in (0.5, 0.25, 0.1, 0.33):
                got = target_grid(rows, cols, ratio)
                assert got == expected_grid(rows, cols, ratio), (rows, cols, ratio)
                assert got[0] * got[1] <= max(1, math.ceil(ratio * rows * cols - 1e-9))


def by_hand(tiny_dirs, fam, vlm, images, video, ratio):
    """The reference prompt: each medium resized with PIL to its target grid, prepared by a model loaded with
    processor bounds that keep exactly those sizes."""
    ip = vlm.image_processor
    unit, merge = ip.patch_size * ip.merge_size, ip.merge_size
    sizes, new_images = [], []
    for im, g in zip(images, vlm.prepare(images=images, question=QUESTION).model_inputs["image_grid_thw"]) \
            if images else []:
        r, c = expected_grid(int(g[1]) // merge, int(g[2]) // merge, ratio)
        sizes.append(r * c * unit * unit)
        new_images.append(im.resize((c * unit, r * unit), resample=ip.resample))
    new_video = None
    if video is not None:
        g = vlm.prepare(video=video, question=QUESTION).model_inputs["video_grid_thw"][0]
        r, c = expected_grid(int(g[1]) // merge, int(g[2]) // merge, ratio)
        sizes.append(r * c * unit * unit)
        new_video = Video([f.resize((c * unit, r * unit), resample=ip.resample) for f in video], fps=video.fps)
    other = explainprune.load(tiny_dirs(fam), size={"shortest_edge": min(sizes), "longest_edge": max(sizes)})
    return other.prepare(images=new_images or None, video=new_video, question=QUESTION)


@pytest.mark.parametrize("fam", DYNAMIC)
def test_downsample_equals_media_resized_by_hand(load_tiny, tiny_dirs, fam):
    vlm = load_tiny(fam)
    images = [random_image(0, (112, 168)), random_image(1, (84, 84))]
    video = Video([random_image(10 + k, (112, 112)) for k in range(4)], fps=1.0)
    pruner = get_pruner("downsample")
    for imgs, vid, ratio in ((images, None, 0.25), (None, video, 0.5), (images[:1], video, 0.1)):
        p = vlm.prepare(images=imgs, video=vid, question=QUESTION)
        small = pruner.prompt(vlm, p, ratio)
        ref = by_hand(tiny_dirs, fam, vlm, imgs, vid, ratio)
        assert torch.equal(small.input_ids, ref.input_ids)  # same token counts (and Qwen3-VL timestamps)
        assert torch.equal(small.position_ids, ref.position_ids)
        torch.testing.assert_close(small.inputs_embeds, ref.inputs_embeds)
        for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            assert (key in small.model_inputs) == (key in ref.model_inputs)
            if key in ref.model_inputs:
                assert torch.equal(small.model_inputs[key], ref.model_inputs[key])
        assert small.num_visual <= math.ceil(ratio * p.num_visual) + 1  # per medium at most its ceil
        out = pruner.generate(vlm, p, ratio, max_new_tokens=3)
        assert out.visual_tokens == small.num_visual and out.token_ids == vlm.generate(ref, max_new_tokens=3).token_ids
    assert vlm.image_processor.size == explainprune.load(tiny_dirs(fam)).image_processor.size  # swapped back


def test_downsample_counts_and_batch(load_tiny):
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(2, (196, 252)), question=QUESTION)  # 7 x 9 tokens
    assert p.num_visual == 63
    pruner = get_pruner("downsample")
    assert [pruner.prompt(vlm, p, r).num_visual for r in (0.5, 0.25, 0.1)] == [30, 16, 6]  # 5x6, 4x4, 2x3
    assert [pruner.prompt(vlm, p, r).num_visual for r in (np.float32(0.25), torch.tensor(0.25))] == [16, 16]
    q = vlm.prepare(images=random_image(3, (56, 84)), question=QUESTION)
    batch = pruner.generate(vlm, [p, q], 0.25, max_new_tokens=3)
    assert [b.token_ids for b in batch] == [pruner.generate(vlm, x, 0.25, max_new_tokens=3).token_ids for x in (p, q)]
    with pytest.raises(ValueError, match="does not rank the visual tokens"):
        pruner.score(vlm, p)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        pruner.generate(vlm, p, 0.0)


@pytest.mark.parametrize("fam", ["llava", "llava_onevision"])
def test_downsample_refuses_fixed_resolution_families(load_tiny, fam):
    vlm = load_tiny(fam)
    p = vlm.prepare(images=random_image(0), question=QUESTION)
    with pytest.raises(ValueError, match=f"downsample needs a family with dynamic resolution.*'{fam}'"):
        get_pruner("downsample").generate(vlm, p, 0.5, max_new_tokens=2)
