"""CDPruner against a literal reading of the authors' rule (``encode_images`` in CDPruner's llava_arch.py),
written here as the DEFINITION of greedy DPP MAP (Schur complements of the kernel), not the Cholesky update."""

from __future__ import annotations

import math

import pytest
import torch

from explainprune import get_pruner
from explainprune.pruning.cdpruner import conditional_relevance, dpp_kernel, greedy_map_order
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


def reference_keep(visual: torch.Tensor, text: torch.Tensor, count: int) -> list[int]:
    """The authors' rule, literally: unit features after the projector; relevance = minus the mean cosine with
    the instruction, shifted by its minimum plus 1e-6 and divided by its range; kernel r_i cos(i, j) r_j;
    ``count`` greedy steps, each adding the token whose log-det gain (Schur complement) is largest."""
    v = torch.nn.functional.normalize(visual.double(), dim=-1)
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    raw = -(v @ t.T).mean(1)
    rel = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
    kern = rel[:, None] * (v @ v.T) * rel[None, :]
    picked: list[int] = []
    for _ in range(count):
        best, best_gain = -1, -math.inf
        for i in range(len(v)):
            if i in picked:
                continue
            if picked:
                s = torch.tensor(picked)
                gain = kern[i, i] - kern[i, s] @ torch.linalg.solve(kern[s][:, s], kern[s, i])
            else:
                gain = kern[i, i]
            if gain > best_gain:
                best, best_gain = i, float(gain)
        picked.append(best)
    return sorted(picked)


def same_rows(x: torch.Tensor, a: list[int], b: list[int]) -> bool:
    """Do the index lists pick the same feature rows (as multisets)?"""
    return sorted(map(tuple, x[a].tolist())) == sorted(map(tuple, x[b].tolist()))


def test_cdpruner_equals_the_literal_rule(load_tiny, family):
    vlm = load_tiny(family)
    size = (112, 140) if family.startswith("qwen") else (56, 84)  # 20 Qwen tokens; LLaVA-OV 44, LLaVA 64
    p = vlm.prepare(images=random_image(0, size), question=QUESTION)
    start, end = p.instruction
    visual, text = p.inputs_embeds[0, p.visual_pos].float(), p.inputs_embeds[0, start:end].float()
    assert end > start and p.num_visual <= visual.shape[1]  # the kernel is full rank: no exhaustion here
    pruner = get_pruner("cdpruner")
    for ratio in (0.5, 0.25):
        keep = pruner.keep(vlm, p, ratio)
        count = math.ceil(ratio * p.num_visual)
        ref = reference_keep(visual, text, count)
        # LLaVA-OneVision's newline tokens are exact copies: which copy is picked is a float tie
        assert same_rows(visual, keep.tolist(), ref) and len(keep) == count
        assert keep.tolist() == ref or family == "llava_onevision"
        # the ranking ``score`` gives has the same prefix
        assert sorted(torch.topk(pruner.score(vlm, p), count).indices.tolist()) == keep.tolist()


def test_relevance_and_kernel_hand_made():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0]])
    # cosines with the instruction: 1, 0, 1/sqrt2; negated: -1, 0, -0.707 -> min-max scaled
    rel = conditional_relevance(visual, text)
    torch.testing.assert_close(rel, torch.tensor([1e-6, 1 + 1e-6, 1 - 1 / math.sqrt(2) + 1e-6]))
    torch.testing.assert_close(conditional_relevance(visual, text, negate=False),
                               torch.tensor([1 + 1e-6, 1e-6, 1 / math.sqrt(2) + 1e-6]))
    assert conditional_relevance(visual, text[:0]).tolist() == [1.0, 1.0, 1.0]  # no instruction: plain DPP
    kern = dpp_kernel(visual, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(kern[1, 2], torch.tensor(2 * 3 / math.sqrt(2)))
    torch.testing.assert_close(torch.diagonal(kern), torch.tensor([1.0, 4.0, 9.0]))


def test_greedy_map_prefers_diverse_tokens():
    # two near-copies of the most relevant direction and one orthogonal token: the copy comes last
    visual = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0]])
    rel = torch.tensor([1.0, 0.99, 0.5])
    order = greedy_map_order(dpp_kernel(visual, rel), rel)
    assert order.tolist() == [0, 2, 1]
    # duplicates exhaust the kernel: the remaining pick follows the relevance, never NaN or a repeat
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    order = greedy_map_order(dpp_kernel(dup, torch.tensor([0.2, 0.9, 0.5])), torch.tensor([0.2, 0.9, 0.5]))
    assert order.tolist() == [1, 2, 0]


def test_cdpruner_follows_the_instruction(load_tiny):
    """Another question changes the kept set on the same image (the relevance is instruction-conditioned)."""
    vlm = load_tiny("qwen2_vl")
    image = random_image(3, (112, 112))
    keeps = {q: get_pruner("cdpruner").keep(vlm, vlm.prepare(images=image, question=q), 0.25).tolist()
             for q in ("what digit is in row 1 column 1 ?", "how many cells show a seven ?")}
    assert len(set(map(tuple, keeps.values()))) == 2


def test_cdpruner_generate_and_cost(load_tiny):
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(1), question=QUESTION)
    pruner = get_pruner("cdpruner")
    out = pruner.generate(vlm, p, 0.25, max_new_tokens=3)
    assert out.visual_tokens == math.ceil(0.25 * p.num_visual)
    ref = vlm.generate(p, keep=pruner.keep(vlm, p, 0.25), max_new_tokens=3)
    assert out.token_ids == ref.token_ids
    n, k, m, d = p.num_visual, out.visual_tokens, p.instruction[1] - p.instruction[0], 64
    assert pruner.overhead_flops(d, n, [k, k]) == n * n * d + n * m * d + 2 * n * n + k * k * n // 2 + k * n
    with pytest.raises(ValueError, match="option negate must be bool"):
        get_pruner("cdpruner", negate="yes")
