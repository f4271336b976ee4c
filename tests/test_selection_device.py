"""Selection where the model is: DivPrune's greedy max-min runs on the features' device, only for the kept
count, with no per-step host round trip; uniform's spread order is computed once per grid layout."""

from __future__ import annotations

import torch

from explainprune.pruning import get_pruner, select
from explainprune.pruning.baselines import _spread_order, spread_order
from explainprune.pruning.divprune import max_min_order
from fakedevice import FAKE, FakeDevices


def test_divprune_keep_equals_the_prefix_of_its_ranking(load_tiny):
    vlm = load_tiny("qwen2_vl")
    from explainprune.testing import random_image

    p = vlm.prepare(images=random_image(3, (112, 140)), question="what is here ?")
    pruner = get_pruner("divprune")
    scores = pruner.score(vlm, p)
    for ratio in (1.0, 0.5, 0.25, 0.1, 0.01):
        assert torch.equal(pruner.keep(vlm, p, ratio), select(scores, ratio)), ratio


def test_max_min_steps_are_a_prefix_and_stay_on_the_device():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 16, generator=g) * torch.rand(50, 1, generator=g) * 5  # unequal row norms
    full = max_min_order(feats)
    assert sorted(full.tolist()) == list(range(50))
    assert torch.equal(max_min_order(feats, steps=12), full[:12])
    with FakeDevices():
        on = feats.to(FAKE)
        got = max_min_order(on, steps=12)
        assert got.device == FAKE  # computed there; a mixed-device op would have raised
        assert torch.equal(got.cpu(), full[:12])


def test_spread_order_is_cached_per_layout():
    r, c = torch.meshgrid(torch.arange(9), torch.arange(11), indexing="ij")
    rows, cols = r.flatten(), c.flatten()
    before = _spread_order.cache_info()
    first = spread_order(rows, cols)
    second = spread_order(rows.clone(), cols.clone())
    after = _spread_order.cache_info()
    assert torch.equal(first, second) and sorted(first.tolist()) == list(range(99))
    assert after.hits >= before.hits + 1
    first[0] = -5  # callers get their own copy
    assert int(spread_order(rows, cols)[0]) != -5
