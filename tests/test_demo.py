"""The end-to-end demo on the shipped model, at a tiny size: every step runs, the files open, and a
second run resumes instead of redoing the work."""

from __future__ import annotations

import json

from PIL import Image

from explainprune.demo import DemoConfig, run_demo, summary


def test_demo_end_to_end_and_resume(tmp_path, capsys):
    config = DemoConfig(out=str(tmp_path / "demo"), label_samples=24, epochs=2, eval_samples=8, pictures=1,
                        ratios=(0.5, 0.25), progress=False)
    result = run_demo(config)
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text())
    runs = {(r["method"], r["ratio"]) for r in report["results"]}
    methods = [*config.methods, "learned:compressor=demo"]  # the f_θ shipped with the demo model, too
    assert runs == {("vanilla", 1.0)} | {(m, q) for m in methods if m != "vanilla" for q in config.ratios}
    vanilla = next(r for r in report["results"] if r["method"] == "vanilla")
    for r in report["results"]:
        assert r["n"] + r["not_applicable"] == 8 and (r["not_applicable"] == 0 or r["method"] == "evs")
        if vanilla["accuracy"] > 0 and not r["not_applicable"]:  # evs: against vanilla on its videos
            assert abs(r["preservation"] - 100 * r["accuracy"] / vanilla["accuracy"]) < 1e-6
    assert result.labels.totals["samples"] == 24
    assert result.labels.totals["labeled"] + result.labels.totals["skipped_wrong"] == 24
    for path in result.files.values():
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert min(Image.open(path).size) > 100
    guard = result.train.guard  # f_θ compared with its own input on the validation split, best epoch kept
    assert 0 <= guard["epoch"] <= config.epochs and set(guard) >= {"f_theta", "input", "beats_input", "message"}
    out = capsys.readouterr().out
    assert guard["message"] in out and "learned:compressor=demo: the f_θ shipped with the demo model" in out
    text = summary(result)
    assert "| learned | 25% |" in text and "| learned:compressor=demo | 25% |" in text and "report.md" in text

    again = run_demo(config)  # labels reused, training resumed at its last epoch
    assert again.labels.shards_written == 0 and again.labels.shards_reused > 0
    assert again.train.metrics == result.train.metrics
