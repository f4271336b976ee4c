"""`eval` and `label` take the digits task's size and kind options (cli/task_options.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from explainprune.cli.main import main
from explainprune.cli.task_options import add_task_options, task_options


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_task_options(p)
    return p.parse_args(list(argv))


def test_options_become_task_keywords():
    assert task_options(_parse()) == {}
    got = task_options(_parse("--grid", "8", "--frames", "16", "--cell", "28", "--kinds", "rowcol,video", "count"))
    assert got == {"grid": 8, "frames": 16, "cell": 28, "kinds": ("rowcol", "video", "count")}


@pytest.mark.parametrize("argv,match", [
    (("--grid", "17"), "--grid must be 1..16"), (("--frames", "0"), "--frames must be 1..16"),
    (("--cell", "30"), "--cell must be a positive multiple of 28"), (("--kinds", "rowcol,size"), "unknown size"),
])
def test_bad_options_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        task_options(_parse(*argv))


def test_eval_cli_runs_the_digits_task_at_a_given_size(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_dirs("qwen2_vl")), "--task", "digits", "--grid", "3", "--frames", "2",
                 "--kinds", "rowcol", "video", "--limit", "2", "--methods", "vanilla", "--ratios", "0.5",
                 "--max-new-tokens", "2", "--out", str(out), "--json", "--no-progress", "--no-plots"])
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert data["task"]["grid"] == 3 and data["task"]["frames"] == 2 and data["task"]["kinds"] == ["rowcol", "video"]
    assert [s["kind"] for s in data["samples"]] == ["rowcol", "video"]
    capsys.readouterr()


def test_cli_errors_are_one_line_before_model_work(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--grid", "20", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "explainprune eval: error: --grid must be 1..16 (the coordinate cues encode 16 indices); got 20"
    assert main(["label", "--model", str(tmp_path / "nothing"), "--manifest", str(tmp_path / "m.jsonl"),
                 "--frames", "8", "--out", str(tmp_path / "l")]) == 2
    assert "apply to --task digits" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--task", str(tmp_path), "--grid", "5", "--out", str(tmp_path / "e")]) == 2
    assert "apply to --task digits" in capsys.readouterr().err
