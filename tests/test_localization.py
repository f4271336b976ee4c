"""Localization metrics on hand examples; the report's summaries; the runner on a fake and a tiny model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from explainprune.evaluation.localization import (
    LocalizationReport,
    SampleLocalization,
    chance_level,
    default_scorers,
    mean_ci,
    measure,
    pointing_hit,
    region_auc,
    region_mass,
    wilson_interval,
)
from explainprune.labels import DigitsSource, LabelSample
from explainprune.models.base import Prompt


# -- metrics on hand examples ----------------------------------------------------------------------------
def test_region_mass_clips_negatives_then_normalises():
    # clipped: [0.1, 0.4, 0, 0.5], total 1.0, region {1, 3} holds 0.9
    assert region_mass([0.1, 0.4, -0.2, 0.5], [1, 3]) == pytest.approx(0.9)
    assert region_mass(torch.tensor([1.0, 3.0, 0.0, 0.0]), [0]) == pytest.approx(0.25)
    assert region_mass([2.0, 2.0, 2.0, 2.0], [2]) == pytest.approx(0.25)  # uniform = chance
    assert region_mass([-1.0, 4.0, -3.0, 0.0], [0, 2]) == 0.0  # only negative scores inside
    assert region_mass([0.0, 0.0, 0.0, 0.0], [1]) == pytest.approx(0.25)  # no positive mass -> chance
    assert region_mass([-1.0, -2.0, -3.0, -4.0], [0, 1]) == pytest.approx(0.5)


def test_pointing_hit_and_ties():
    assert pointing_hit([0.1, 0.4, -0.2, 0.5], [1, 3]) == 1.0
    assert pointing_hit([0.1, 0.4, -0.2, 0.5], [0, 1]) == 0.0
    assert pointing_hit([-5.0, -1.0, -3.0, -2.0], [1]) == 1.0  # the top score counts, even negative
    assert pointing_hit([1.0, 1.0, 0.0, 0.0], [0]) == 0.5  # tied maxima split
    assert pointing_hit([1.0, 1.0, 1.0, 1.0], [0, 1, 2]) == 0.75


def test_region_auc_hand_examples():
    assert region_auc([0.1, 0.4, -0.2, 0.5], [1, 3]) == 1.0  # both region tokens above both others
    assert region_auc([0.1, 0.4, -0.2, 0.5], [0, 2]) == 0.0
    assert region_auc([0.1, 0.4, -0.2, 0.5], [0]) == pytest.approx(1 / 3)  # beats only -0.2
    assert region_auc([1.0, 1.0, 1.0, 1.0], [0, 1]) == 0.5  # all ties: half
    assert region_auc([2.0, 1.0, 1.0, 0.0], [1]) == pytest.approx((0 + 0.5 + 1) / 3)
    with pytest.raises(ValueError, match="every token"):
        region_auc([0.1, 0.2], [0, 1])
    g = torch.Generator().manual_seed(0)  # agrees with the pairwise definition on random ties
    s = torch.randint(0, 5, (40,), generator=g).float()
    region = [3, 7, 11, 20, 33]
    others = [j for j in range(40) if j not in region]
    pairs = [(s[i] > s[j]).item() + 0.5 * (s[i] == s[j]).item() for i in region for j in others]
    assert region_auc(s, region) == pytest.approx(sum(pairs) / len(pairs))


def test_chance_and_mean_ci():
    assert chance_level([0, 3], 4) == 0.5 and chance_level([2], 64) == pytest.approx(1 / 64)
    m, ci = mean_ci([0.0, 1.0, 0.0, 1.0])
    assert m == 0.5 and ci == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean_ci([0.3])[0] == 0.3 and math.isnan(mean_ci([0.3])[1])
    assert all(math.isnan(v) for v in mean_ci([]))


def test_wilson_interval():
    lo, hi = wilson_interval(0.0, 40)  # 0 hits in 40: still up to ~8.8%
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 43.8416, abs=1e-4)
    lo, hi = wilson_interval(1.0, 40)
    assert hi == 1.0 and lo == pytest.approx(1 - 3.8416 / 43.8416, abs=1e-4)
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))


@pytest.mark.parametrize("scores, region, match", [
    ([0.1, 0.2], [], "empty"),
    ([0.1, 0.2], [2], "0..1"),
    ([0.1, 0.2], [-1], "0..1"),
    ([0.1, 0.2], [1, 1], "repeat"),
    ([], [0], "non-empty"),
    ([[0.1, 0.2]], [0], "1-D"),
    ([float("nan"), 0.2], [0], "NaN"),
])
def test_metrics_reject_bad_input(scores, region, match):
    for fn in (region_mass, pointing_hit, region_auc):
        with pytest.raises(ValueError, match=match):
            fn(scores, region)


# -- the report ------------------------------------------------------------------------------------------
def _report() -> LocalizationReport:
    s = [SampleLocalization("a", "img", 4, 1, {"x": 0.5, "y": 0.25}, {"x": 1.0, "y": 0.0}, {"x": 1.0, "y": 0.5}),
         SampleLocalization("b", "img", 4, 2, {"x": 1.0, "y": 0.5}, {"x": 1.0, "y": 1.0}, {"x": 0.5, "y": 0.5}),
         SampleLocalization("c", "vid", 8, 1, {"x": 0.0, "y": 0.125}, {"x": 0.0, "y": 0.0}, {"x": 0.0, "y": 0.5})]
    return LocalizationReport(["x", "y"], s, {"img": {"wrong answer": 3}, "vid": {}})


def test_report_summary_per_kind_and_overall():
    summ = _report().summary()
    assert list(summ) == ["img", "vid", "all"]
    assert summ["img"]["used"] == 2 and summ["img"]["skipped"] == {"wrong answer": 3, "no usable region": 0}
    assert summ["all"]["used"] == 3 and summ["all"]["skipped"]["wrong answer"] == 3
    assert summ["img"]["mass"]["x"]["mean"] == pytest.approx(0.75) and summ["img"]["hit"]["y"]["mean"] == 0.5
    assert summ["img"]["mass"]["x"]["ci95"] == pytest.approx(1.96 * math.sqrt(0.125) / math.sqrt(2))
    assert summ["vid"]["chance"] == 0.125 and math.isnan(summ["vid"]["mass"]["x"]["ci95"])
    assert summ["all"]["chance"] == pytest.approx((0.25 + 0.5 + 0.125) / 3)
    assert summ["all"]["num_visual"] == pytest.approx(16 / 3)
    assert summ["all"]["mass"]["x"]["mean"] == pytest.approx(0.5)
    assert summ["img"]["auc"]["x"]["mean"] == 0.75 and summ["all"]["auc"]["y"] == {"mean": 0.5, "ci95": 0.0}
    h = summ["all"]["hit"]["x"]
    assert h["mean"] == pytest.approx(2 / 3) and (h["lo"], h["hi"]) == pytest.approx(wilson_interval(2 / 3, 3))


def test_report_markdown_and_json():
    rep = _report()
    md = rep.to_markdown()
    assert "| | img | vid | all |" in md and "| skipped: wrong answer | 3 | 0 | 3 |" in md
    assert "| x | 0.750 ± 0.490 | 0.000 | 0.500 ± 0.566 |" in md
    assert "| y | 0.500 [0.095, 0.905] |" in md and "| N_v (mean) | 4.0 | 8.0 | 5.3 |" in md
    assert md.count("| chance (region size / N_v) | 0.375 | 0.125 | 0.292 |") == 2
    assert "| y | 0.500 ± 0.000 | 0.500 | 0.500 ± 0.000 |" in md and "| chance | 0.500 | 0.500 | 0.500 |" in md
    data = json.loads(json.dumps(rep.to_json()))
    assert data["methods"] == ["x", "y"] and len(data["samples"]) == 3
    assert data["summary"]["all"]["hit"]["x"]["mean"] == pytest.approx(2 / 3)


# -- the runner ------------------------------------------------------------------------------------------
class FakeVLM:
    """prepare() builds a 1 x rows x cols grid; generate() answers "7" (token 7, then eos 2)."""

    eos_token_ids = [2]

    def prepare(self, images=None, video=None, question=""):
        rows, cols = images
        n = rows * cols
        grid = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(rows),
                                          torch.arange(cols), indexing="ij"), -1).reshape(-1, 3)
        length = n + 3
        return Prompt(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, length, 4),
                      torch.arange(length)[None], torch.ones(1, length, dtype=torch.long),
                      torch.arange(1, n + 1), grid, (n + 1, length), question)

    def generate(self, prompt, max_new_tokens=4):
        return SimpleNamespace(text="7", token_ids=[7, 2])


def test_measure_skips_wrong_answers_and_missing_regions():
    samples = [LabelSample("r0", "q", "7", images=(2, 2), region=[(0, 1, 1)], meta={"kind": "k"}),
               LabelSample("r1", "q", "3", images=(2, 2), region=[(0, 0, 0)], meta={"kind": "k"}),
               LabelSample("r2", "q", "7", images=(2, 3), region=None, meta={"kind": "m"}),
               LabelSample("r3", "q", "7", images=(2, 3), region=[(0, 0, 0), (0, 1, 2)], meta={"kind": "m"})]
    seen = []

    def last(vlm, prompt, ids):  # one-hot on the last visual token (grid cell (1, cols-1))
        seen.append(ids)
        s = torch.zeros(prompt.num_visual)
        s[-1] = 1.0
        return s

    rep = measure(FakeVLM(), samples, {"last": last})
    assert [s.id for s in rep.samples] == ["r0", "r3"] and seen == [[7], [7]]
    assert rep.skipped == {"k": {"wrong answer": 1}, "m": {"no usable region": 1}}
    assert rep.samples[0].mass["last"] == 1.0 and rep.samples[0].hit["last"] == 1.0
    assert rep.samples[0].auc["last"] == 1.0 and rep.samples[1].auc["last"] == 0.75  # (4 wins + 4 ties / 2) / 8
    assert rep.samples[1].region_size == 2 and rep.samples[1].chance == pytest.approx(2 / 6)
    assert rep.info["only_correct"] is True
    rep = measure(FakeVLM(), samples, {"last": last}, only_correct=False)
    assert [s.id for s in rep.samples] == ["r0", "r1", "r3"] and rep.samples[1].mass["last"] == 0.0


def test_default_scorers_on_a_tiny_model(load_tiny):
    """Every default scorer returns a finite [N_v] score on real digits prompts (random weights: wrong
    answers, so ``only_correct=False``)."""
    vlm = load_tiny("qwen2_vl")
    source = DigitsSource(split="test", n=2)
    scorers = default_scorers(fastv_layers=(1,), seed=0)
    assert list(scorers) == ["R_v (Eq. 1)", "A_v^0 (head mean)", "FastV K=1", "random"]
    rep = measure(vlm, source, scorers, only_correct=False)
    assert len(rep.samples) == 2
    for s in rep.samples:
        assert s.num_visual >= 16 and 1 <= s.region_size < s.num_visual
        for name in scorers:
            assert 0.0 <= s.mass[name] <= 1.0 and 0.0 <= s.hit[name] <= 1.0 and 0.0 <= s.auc[name] <= 1.0
    again = measure(vlm, source, default_scorers(fastv_layers=(1,), seed=0), only_correct=False)
    assert again.samples[0].mass == rep.samples[0].mass  # deterministic, random scores included


def test_random_scorer_is_fresh_per_sample_and_seeded():
    """Unlike the ``random`` pruner (seeded by the prompt's tokens), the same prompt gets new draws."""
    prompt = FakeVLM().prepare((2, 2))
    rand = default_scorers(fastv_layers=(), seed=3)["random"]
    first, second = rand(None, prompt, [7]), rand(None, prompt, [7])
    assert first.shape == (4,) and not torch.equal(first, second)
    assert torch.equal(default_scorers(fastv_layers=(), seed=3)["random"](None, prompt, [7]), first)


def test_head_scorers_slice_first_layer_attention(load_tiny):
    from explainprune.attention import first_layer_attention
    from explainprune.evaluation.localization import head_scorers

    vlm = load_tiny("qwen2_vl")
    prompt = vlm.prepare(images=DigitsSource(split="test", n=1)[0].images, question="what digit")
    att = first_layer_attention(vlm, prompt)
    scorers = head_scorers(att.shape[0])
    assert list(scorers) == [f"A_v^0 head {h}" for h in range(att.shape[0])]
    assert torch.equal(scorers["A_v^0 head 1"](vlm, prompt, [1]), att[1])
