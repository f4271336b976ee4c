"""Report aggregation (accuracy, preservation, Avg. (%) over kinds), markdown tables, JSON, files, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from explainprune.evaluation.plots import save_plots, series
from explainprune.evaluation.report import Report, SampleRecord, aggregate


def rec(method: str, ratio: float, kind: str, correct: bool, kept: int = 10, layer: int = 0,
        new_tokens: int = 3, decode_s: float = 0.2, kv: int = 2048) -> SampleRecord:
    n_visual, layers = 20, 4
    retention = (layer * n_visual + (layers - layer) * kept) / (layers * n_visual)
    return SampleRecord(id="s", kind=kind, method=method, ratio=ratio, question="q", reference="7",
                        prediction="7" if correct else "1", correct=correct, n_visual=n_visual, kept=kept,
                        layer=layer, average_retention=retention, flops_llm=1000 * kept, flops_overhead=5,
                        prefill_s=0.5, decode_s=decode_s, total_s=1.0, new_tokens=new_tokens, kv_bytes=kv)


def records() -> list[SampleRecord]:
    rows = [rec("vanilla", 1.0, "image", True, kept=20), rec("vanilla", 1.0, "image", True, kept=20),
            rec("vanilla", 1.0, "video", True, kept=20), rec("vanilla", 1.0, "video", False, kept=20)]
    rows += [rec("fastv", 0.5, "image", True, layer=2), rec("fastv", 0.5, "image", False, layer=2),
             rec("fastv", 0.5, "video", True, layer=2), rec("fastv", 0.5, "video", False, layer=2)]
    rows += [rec("learned", 0.5, "image", True, decode_s=0.4, new_tokens=5) for _ in range(2)]
    rows += [rec("learned", 0.5, "video", False, decode_s=0.4, new_tokens=1) for _ in range(2)]
    return rows


def test_aggregate_numbers():
    res = {r.method: r for r in aggregate(records())}
    van, fastv, learned = res["vanilla"], res["fastv"], res["learned"]
    assert van.accuracy == 0.75 and van.preservation == 100.0
    assert van.accuracy_by_kind == {"image": 1.0, "video": 0.5}
    assert fastv.accuracy == 0.5 and fastv.preservation == pytest.approx(100 * 0.5 / 0.75)
    # Avg. (%): mean over kinds of per-kind preservation: image 50/100, video 50/50
    assert fastv.avg_preservation == pytest.approx((50.0 + 100.0) / 2)
    assert learned.avg_preservation == pytest.approx((100.0 + 0.0) / 2)
    assert fastv.average_retention == pytest.approx((2 + 2 * 0.5) / 4) and fastv.layer == 2
    assert learned.average_retention == pytest.approx(0.5) and learned.effective_ratio == 0.5
    assert learned.flops == 10_005 and learned.flops_overhead == 5
    # decode time per generated token after the first: (4 * 0.4) / (2 * 4 + 2 * 0)
    assert learned.decode_per_token_s == pytest.approx(1.6 / 8)
    assert [r.method for r in aggregate(records())] == ["vanilla", "fastv", "learned"]


def test_no_vanilla_accuracy_gives_no_preservation():
    rows = [rec("vanilla", 1.0, "image", False), rec("random", 0.5, "image", True)]
    res = aggregate(rows)
    assert res[1].preservation is None and res[1].avg_preservation is None
    report = Report.from_records(rows, model="m", task={}, config={}, shape={}, environment={})
    assert "| random | 50% |" in report.to_markdown()
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["results"][1]["preservation"] is None


def test_markdown_json_roundtrip_and_files(tmp_path):
    report = Report.from_records(records(), model="/x/demo", task={"task": "digits"}, config={"ratios": [0.5]},
                                 shape={"hidden": 64}, environment={})
    md = report.to_markdown()
    assert "| Method | Retention | image | video | Acc. | Preservation (%) | Avg. (%) |" in md
    assert "| fastv | 50% | 50.0 | 50.0 | 50.0 | 66.7 | 75.0 |" in md
    assert ("| Avg. retention over layers | FLOPs (K) | Scoring (ms) | Prefill (ms) | Decode (ms/token) | "
            "KV cache (KiB) |") in md
    assert "| fastv | 50% | 75.0% | 10.005 | 0.0 | 500.0 | 100.00 | 2.0 | 66.7 |" in md
    again = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert again.to_markdown() == md and len(again.samples) == 12
    assert report.result("learned", 0.5).accuracy == 0.5
    with pytest.raises(KeyError, match="no result"):
        report.result("oracle")
    paths = report.save(tmp_path)
    paths.update(save_plots(report, tmp_path))
    assert json.loads(paths["json"].read_text())["samples"][0]["prediction"] == "7"
    assert paths["markdown"].read_text() == md
    for key in ("plot_retention", "plot_flops"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_sorted_and_matplotlib_lazy():
    report = Report.from_records(records() + [rec("fastv", 0.25, "image", True, kept=5, layer=2)],
                                 model="m", task={}, config={}, shape={}, environment={})
    pts = series(report, "retention")
    assert pts["vanilla"] == [(100.0, 100.0)]
    assert [x for x, _ in pts["fastv"]] == sorted(x for x, _ in pts["fastv"])
    assert series(report, "flops")["learned"] == [(10_005.0, pytest.approx(200 / 3))]
    code = ("import sys, explainprune.evaluation.runner, explainprune.evaluation.report, "
            "explainprune.evaluation.plots, explainprune.cli.main; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_intervals_wilson_and_paired_bootstrap():
    from explainprune.evaluation.stats import paired_ratio_ci, wilson

    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook Wilson interval
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775 and wilson(0, 0) is None
    same = [1, 0, 1, 1, 0, 1] * 20
    assert paired_ratio_ci(same, same) == pytest.approx((100.0, 100.0))  # paired: identical answers
    lo, hi = paired_ratio_ci([1] * 60 + [0] * 60, [1] * 120)
    assert lo < 50.0 < hi and hi - lo < 25
    res = {r.method: r for r in aggregate(records())}
    assert res["fastv"].accuracy_ci == pytest.approx(list(wilson(2, 4)))
    assert res["vanilla"].preservation_ci == pytest.approx([100.0, 100.0])
    lo, hi = res["fastv"].preservation_ci
    assert lo <= res["fastv"].preservation <= hi


def test_matched_cost_table_compares_at_equal_flops():
    """An in-LLM method costs more at the same ratio: at the 10% budget it has no entry, and the cheaper
    method wins where both fit."""
    shape = {"hidden": 8, "intermediate": 16, "layers": 4, "ffn_matrices": 3}
    from explainprune.evaluation.flops import LLMShape, kept_count, llm_flops

    s = LLMShape(**shape)

    def row(method, ratio, correct, kept, layer):
        per_layer = [20] * layer + [kept] * (4 - layer)
        r = rec(method, ratio, "image", correct, kept=kept, layer=layer)
        r.flops_llm, r.flops_overhead = llm_flops(per_layer, s), 0
        return r

    rows = [row("vanilla", 1.0, True, 20, 0) for _ in range(4)]
    for q in (0.5, 0.1):
        k = kept_count(20, q)
        rows += [row("pre", q, i < (3 if q == 0.5 else 1), k, 0) for i in range(4)]
        rows += [row("inllm", q, True, k, 2) for _ in range(4)]
    report = Report.from_records(rows, model="m", task={}, config={}, shape=shape, environment={})
    assert [q for q, _ in report.budgets()] == [0.5, 0.1]
    table = report.matched_cost_table()
    assert "| pre | **75.0** (50%) | **25.0** (10%) |" in table  # in-LLM at 10% costs more than 'pre' at 50%
    assert "| inllm | – | – |" in table
    assert "Preservation at matched FLOPs" in report.to_markdown() and "Preservation 95% CI" in report.to_markdown()


def test_matched_cost_budgets_are_taken_over_the_samples_a_method_ran_on():
    """A method that ran on the larger inputs only (e.g. a video-only method in a mixed evaluation) is
    compared with the budget of those inputs, not with the mean over every sample."""
    shape = {"hidden": 8, "intermediate": 16, "layers": 4, "ffn_matrices": 3}
    from explainprune.cost import LLMShape, kept_count, llm_flops

    s = LLMShape(**shape)

    def row(method, ratio, n, kept):
        r = rec(method, ratio, "video" if n == 40 else "image", True, kept=kept)
        r.n_visual, r.flops_llm, r.flops_overhead = n, llm_flops([kept] * 4, s), 0
        return r

    rows = [row("vanilla", 1.0, n, n) for n in (20, 20, 40, 40)]
    rows += [row("videos", 0.5, 40, kept_count(40, 0.5)) for _ in range(2)]
    rows += [row("all", 0.5, n, kept_count(n, 0.5)) for n in (20, 20, 40, 40)]
    report = Report.from_records(rows, model="m", task={}, config={}, shape=shape, environment={})
    assert report.budgets()[0][1] < llm_flops([20] * 4, s)  # the mean over all samples is cheaper
    table = report.matched_cost_table()
    assert "| videos | **100.0** (50%) |" in table and "| all | **100.0** (50%) |" in table


def test_report_does_not_import_plots():
    """plots.py reads a Report; report.py imports plots nowhere (not even lazily inside a function)."""
    import ast

    import explainprune.evaluation.report as report_module

    tree = ast.parse(open(report_module.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("plots" in (m or "") for m in imported), imported
    code = "import sys, explainprune.evaluation.report; print('explainprune.evaluation.plots' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
