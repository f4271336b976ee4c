"""benchmarks/larger_inputs.py: one evaluation per size setting, the summary table and the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "larger_inputs", Path(__file__).resolve().parents[1] / "benchmarks" / "larger_inputs.py")
larger_inputs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(larger_inputs)


def test_settings_count_visual_tokens():
    got = larger_inputs.settings([4, 8], [16])
    assert [(n, t) for n, _, t in got] == [("grid4", 64), ("grid8", 256), ("frames16", 1024)]
    assert got[2][1] == {"frames": 16, "kinds": ("video",)}


def test_runs_every_setting_and_writes_summary_and_plot(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "large"
    code = larger_inputs.main(["--model", str(tiny_dirs("qwen2_vl")), "--grids", "2", "3", "--frames", "2",
                               "--methods", "vanilla", "random", "nosuch", "--ratios", "0.5", "--limit", "2",
                               "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "summary.json").read_text())
    assert [(r["setting"], r["method"], r["ratio"], r["tokens"]) for r in data["rows"]] == [
        ("grid2", "random", 0.5, 16), ("grid3", "random", 0.5, 36), ("frames2", "random", 0.5, 128)]
    assert (out / "grid3" / "report.json").is_file() and (out / "preservation_vs_size.png").is_file()
    md = (out / "summary.md").read_text()
    assert "| image method | grid2 (16 tok) 50% | grid3 (36 tok) 50% |" in md and "| video method |" in md
    assert "'nosuch' is not registered" in capsys.readouterr().err
