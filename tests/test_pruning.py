"""select(), the registry and the training-free pruners."""

from __future__ import annotations

import math

import pytest
import torch

from explainprune import get_pruner, select
from explainprune.pruning import available
from explainprune.pruning.baselines import spread_order
from explainprune.testing import random_image


def test_select_keeps_sorted_top_ceil():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0])
    assert select(scores, 0.5).tolist() == [1, 2, 3, 5]  # ceil(3.5) = 4 tokens: .9 .8 .7 .3
    assert select(scores, 1.0).tolist() == list(range(7))
    assert select(scores, 0.01).tolist() == [1]  # at least one
    assert len(select(torch.rand(100), 0.25)) == 25
    assert len(select(torch.rand(10), 0.25)) == math.ceil(2.5)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), "half", None, True])
def test_select_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        select(torch.rand(4), ratio)


def test_select_rejects_bad_scores():
    with pytest.raises(ValueError, match="has 3 entries but the prompt has 4"):
        select(torch.rand(3), 0.5, num_visual=4)
    with pytest.raises(ValueError, match="NaN"):
        select(torch.tensor([0.1, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="no visual tokens"):
        select(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        select(torch.rand(2, 2), 0.5)


def test_prompt_without_visual_tokens_is_rejected(load_tiny):
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(question="what digit is in row 2 column 3 ?")
    assert p.num_visual == 0
    with pytest.raises(ValueError, match="no visual tokens"):
        get_pruner("uniform").keep(vlm, p, 0.5)


def test_registry_suggests_close_names():
    assert {"vanilla", "random", "uniform"} <= set(available())
    with pytest.raises(ValueError, match="did you mean 'random'.*available: .*uniform"):
        get_pruner("randon")
    with pytest.raises(ValueError, match="accepts options"):
        get_pruner("uniform", sede=1)


def test_random_is_seeded(load_tiny, image):
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=image, question="how many 3 are there ?")
    a = get_pruner("random", seed=0).keep(vlm, p, 0.25)
    assert torch.equal(a, get_pruner("random", seed=0).keep(vlm, p, 0.25))
    assert not torch.equal(a, get_pruner("random", seed=1).keep(vlm, p, 0.25))
    other = vlm.prepare(images=random_image(5), question="how many 3 are there ?")  # same tokens, other image
    assert torch.equal(other.input_ids, p.input_ids)
    assert not torch.equal(a, get_pruner("random", seed=0).keep(vlm, other, 0.25))


def test_spread_order_prefixes_cover_quadrants():
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    rank = spread_order(r.flatten(), c.flatten())
    assert sorted(rank.tolist()) == list(range(64))
    first = rank < 16
    quads = [(first & ((r.flatten() < 4) == a) & ((c.flatten() < 4) == b)).sum().item()
             for a in (True, False) for b in (True, False)]
    assert min(quads) >= 3, quads


def test_uniform_spreads_over_frames(load_tiny, frames):
    vlm = load_tiny("llava")  # 4 frames x 8 x 8 tokens
    p = vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?")
    keep = get_pruner("uniform").keep(vlm, p, 0.25)
    per_frame = torch.bincount(p.visual_grid[keep, 0], minlength=4)
    assert per_frame.tolist() == [16, 16, 16, 16]
