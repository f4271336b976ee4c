"""The peers (cdpruner, evs, downsample) in ``explainprune eval``: a mixed image / video evaluation where evs
applies to the videos only (n/a rows for the images, the run goes on), and every peer reachable by name."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from explainprune.evaluation.flops import LLMShape
from explainprune.evaluation.report import Report
from explainprune.evaluation.runner import EvalConfig, run_eval, run_one
from explainprune.labels import ManifestSource
from explainprune.testing import random_image

MAX_NEW = 3


@pytest.fixture(scope="module")
def qwen(load_tiny):
    return load_tiny("qwen2_vl")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, qwen):
    """Two images (the second with a wrong reference) and two videos whose references are vanilla's answers."""
    d = tmp_path_factory.mktemp("peers")
    rows = []
    for i in range(4):
        question = "what digit is in row 1 column 2 ?"
        if i < 2:
            random_image(i).save(d / f"img{i}.png")
            media, rec = {"images": random_image(i)}, {"image": f"img{i}.png"}
        else:
            frames = [random_image(10 * i + k, (112, 140)) for k in range(4)]  # 2 x 20 tokens: dearer than images
            for k, f in enumerate(frames):
                f.save(d / f"v{i}f{k}.png")
            media, rec = {"video": frames}, {"video": [f"v{i}f{k}.png" for k in range(4)]}
        text = qwen.generate(qwen.prepare(question=question, **media), max_new_tokens=MAX_NEW).text
        rows.append({"id": f"s{i}", "question": question, "answer": "zzz" if i == 1 else text, **rec})
    path = d / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mixed_eval_marks_images_not_applicable(qwen, manifest, tmp_path):
    samples = ManifestSource(manifest)
    config = EvalConfig(methods=("evs", "cdpruner"), ratios=(0.5,), max_new_tokens=MAX_NEW, progress=False,
                        warmup=False)
    report = run_eval(qwen, samples, config, records=tmp_path / "records.jsonl")
    evs = report.result("evs", 0.5)
    assert (evs.n, evs.not_applicable, evs.not_applicable_kinds) == (2, 2, ["image"])
    assert set(evs.accuracy_by_kind) == {"video"}
    rows = [r for r in report.samples if r.method == "evs"]
    assert [r.applicable for r in rows] == [False, False, True, True]
    # the video rows are exactly what run_one measures, the numbers are over them only
    shape = LLMShape.from_config(qwen.text_config)
    from explainprune import get_pruner

    for r, i in zip(rows[2:], (2, 3)):
        s = samples[i]
        p = qwen.prepare(video=s.video, question=s.question)
        again = run_one(qwen, get_pruner("evs"), "evs", p, s, 0.5, shape, MAX_NEW)
        assert (again.kept, again.prediction, again.flops_llm) == (r.kept, r.prediction, r.flops_llm)
    assert evs.accuracy == pytest.approx((rows[2].correct + rows[3].correct) / 2)
    assert evs.effective_ratio == pytest.approx((rows[2].kept / rows[2].n_visual + rows[3].kept / rows[3].n_visual) / 2)
    # vanilla is right on both videos and wrong on one image (75% overall): evs preserves against the videos' 100%
    assert report.result("vanilla").accuracy == pytest.approx(0.75)
    assert evs.preservation == pytest.approx(100 * evs.accuracy)
    assert report.result("cdpruner", 0.5).n == 4 and report.result("cdpruner", 0.5).not_applicable == 0
    md = report.to_markdown()
    row = next(line for line in md.splitlines() if line.startswith("| evs | 50% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "n/a" and cells[3] != "n/a"  # kinds: image, video
    assert "evs at 50%: n/a on 2 of 4 samples" in md
    # the records resume into the same report, and the JSON round-trips
    again = run_eval(qwen, samples, config, records=tmp_path / "records.jsonl")
    assert again.result("evs", 0.5).not_applicable == 2
    back = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert back.result("evs", 0.5).not_applicable_kinds == ["image"]


def test_eval_of_images_only_with_evs_runs_through(qwen, manifest, tmp_path):
    samples = ManifestSource(manifest)
    images = [samples[0], samples[1]]
    config = EvalConfig(methods=("evs",), ratios=(0.25,), max_new_tokens=MAX_NEW, progress=False, warmup=False)
    report = run_eval(qwen, images, config)
    evs = report.result("evs", 0.25)
    assert evs.n == 0 and evs.not_applicable == 2 and math.isnan(evs.accuracy)
    md = report.to_markdown()
    assert "| evs | 25% | n/a | n/a |" in md
    paths = report.save(tmp_path)
    assert json.loads(paths["json"].read_text())["results"][1]["accuracy"] is None


def test_peers_through_the_lmms_eval_engine(qwen):
    """The lmms-eval model's engine takes the peers by name: answers and kept counts as the pruners give them
    (one by one and as a ragged batch); evs on an image request refuses with its message."""
    from explainprune import get_pruner
    from explainprune.errors import NotApplicable
    from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request

    image, frames = random_image(4, (112, 140)), [random_image(30 + k, (56, 84)) for k in range(4)]
    q = "what digit is in row 1 column 2 ?"
    clip = np.stack([np.asarray(f) for f in frames])  # THWC: a video, as lmms-eval may hand it over
    requests = [Request(q, [image], {"max_new_tokens": 3}, "t", 0), Request(q, clip, {"max_new_tokens": 3}, "t", 1)]
    prompts = [qwen.prepare(images=[image], question=q), qwen.prepare(video=frames, question=q)]
    for method in ("cdpruner", "downsample"):
        engine = PrunedEngine(qwen, method, 0.25, warmup=False)
        alone = [engine.run([r])[0].text for r in requests]
        assert [a.text for a in engine.run(requests)] == alone
        expected = [get_pruner(method).generate(qwen, p, 0.25, max_new_tokens=3) for p in prompts]
        assert alone == [e.text for e in expected]
        assert [r.kept for r in engine.records[:2]] == [e.visual_tokens for e in expected]
    engine = PrunedEngine(qwen, "evs", 0.25, warmup=False)
    assert engine.run([requests[1]])[0].text == get_pruner("evs").generate(qwen, prompts[1], 0.25,
                                                                           max_new_tokens=3).text
    with pytest.raises(NotApplicable, match="evs prunes videos only"):
        engine.run([requests[0]])


def test_na_method_costs_against_vanilla_on_its_own_samples(qwen, manifest):
    """FLOPs (% of vanilla) and the matched-FLOPs budgets of a method n/a on some samples use the samples it
    ran on: evs on the videos is compared with vanilla on the same videos, not with the cheaper images."""
    samples = ManifestSource(manifest)
    config = EvalConfig(methods=("evs",), ratios=(0.5,), max_new_tokens=MAX_NEW, progress=False, warmup=False)
    report = run_eval(qwen, samples, config)
    evs = report.result("evs", 0.5)
    assert report.applicable_ids(evs) == {"s2", "s3"}
    videos = [r.flops for r in report.samples if r.method == "vanilla" and r.id in ("s2", "s3")]
    row = next(line for line in report.efficiency_table().splitlines() if line.startswith("| evs | 50% |"))
    assert row.strip("| ").split(" | ")[-1] == f"{100 * evs.flops / (sum(videos) / 2):.1f}"
    (q, video_budget), = report.budgets({"s2", "s3"})
    (_, all_budget), = report.budgets()
    assert all_budget < evs.flops <= video_budget * 1.02  # within its own budget only
    assert f"| evs | {evs.preservation:.1f} (50%) |" in report.matched_cost_table().replace("**", "")
