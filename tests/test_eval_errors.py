"""Evaluation with user data: answer lists scored, records streamed and resumed after an interruption,
unreadable media (--on-error), report files written atomically."""

from __future__ import annotations

import json
import pathlib
import shlex

import pytest

import explainprune.evaluation.runner as runner
from explainprune.cli.main import main
from explainprune.errors import InputError
from explainprune.evaluation.report import Report
from explainprune.evaluation.runner import EvalConfig, run_eval
from explainprune.sources import ManifestSource
from hostile_media import truncated_png
from test_runner import MAX_NEW, manifest, qwen  # noqa: F401  (fixtures)

REAL_RUN_ONE = runner.run_one
CONFIG = dict(methods=("vanilla", "uniform"), ratios=(0.5,), max_new_tokens=MAX_NEW, progress=False, warmup=False)


def with_answers(manifest, tmp_path, change):  # noqa: F811
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for r in rows:
        for k in ("image", "images", "video"):  # absolute paths: the new manifest lives elsewhere
            if isinstance(r.get(k), str):
                r[k] = str(manifest.parent / r[k])
            elif k in r:
                r[k] = [str(manifest.parent / p) for p in r[k]]
    rows = change(rows)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_answer_lists_are_scored_as_alternatives(qwen, manifest, tmp_path):  # noqa: F811
    def alternatives(rows):
        return [{**r, "answer": ["no such answer", r["answer"]]} for r in rows]

    path = with_answers(manifest, tmp_path, alternatives)
    rep = run_eval(qwen, ManifestSource(path), EvalConfig(**CONFIG))
    assert rep.result("vanilla").accuracy == 1.0
    assert rep.samples[0].reference.startswith("no such answer | ")


class Counting:
    """run_one that counts calls and raises KeyboardInterrupt at call ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, *args, **kwargs):
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        return REAL_RUN_ONE(*args, **kwargs)


def correctness(report):
    return [(s.id, s.method, s.ratio, s.prediction, s.correct) for s in report.samples]


def test_interrupted_eval_resumes_from_its_records(qwen, manifest, tmp_path, monkeypatch):  # noqa: F811
    samples, records = ManifestSource(manifest), tmp_path / "records.jsonl"
    full = run_eval(qwen, samples, EvalConfig(**CONFIG))
    count = Counting(stop_at=3)  # 2 runs per sample: killed inside sample 1
    monkeypatch.setattr(runner, "run_one", count)
    with pytest.raises(KeyboardInterrupt):
        run_eval(qwen, samples, EvalConfig(**CONFIG), records=records)
    assert len(records.read_text().splitlines()) == 2  # header + sample 0
    with records.open("a") as fh:
        fh.write('{"sample": 1, "recor')  # a torn line (killed while writing)
    count = Counting()
    monkeypatch.setattr(runner, "run_one", count)
    resumed = run_eval(qwen, samples, EvalConfig(**CONFIG), records=records)
    assert count.calls == 4 and correctness(resumed) == correctness(full)
    count = Counting()
    monkeypatch.setattr(runner, "run_one", count)
    again = run_eval(qwen, samples, EvalConfig(**CONFIG), records=records)  # finished: rebuilt, no model work
    assert count.calls == 0 and correctness(again) == correctness(full)
    # other ratios: not the same evaluation, so it is refused (naming what differs), or replaced with overwrite
    before = records.read_bytes()
    with pytest.raises(InputError, match=r"another evaluation \(differs in config.ratios \(\[0.5\] recorded, "
                       r"now \[0.25\]\)\).*--overwrite"):
        run_eval(qwen, samples, EvalConfig(**{**CONFIG, "ratios": (0.25,)}), records=records)
    assert records.read_bytes() == before and count.calls == 0
    other = run_eval(qwen, samples, EvalConfig(**{**CONFIG, "ratios": (0.25,)}), records=records, overwrite=True)
    assert count.calls == 6 and {s.ratio for s in other.samples} == {1.0, 0.25}


def test_ctrl_c_in_eval_cli_then_the_printed_command_resumes(tiny_dirs, manifest, tmp_path, capsys,  # noqa: F811
                                                             monkeypatch):
    out = tmp_path / "e"
    argv = ["eval", "--model", str(tiny_dirs("qwen2_vl")), "--task", str(manifest), "--methods", "vanilla",
            "--ratios", "0.5", "--max-new-tokens", str(MAX_NEW), "--out", str(out), "--no-progress", "--no-plots"]
    monkeypatch.setattr(runner, "run_one", Counting(stop_at=2))
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # after the model's loading bar
    assert err == [f"explainprune eval: interrupted: 2 finished samples kept in {out / 'records.jsonl'}; "
                   f"to resume: explainprune {shlex.join(argv)}"]
    count = Counting()
    monkeypatch.setattr(runner, "run_one", count)
    assert main(shlex.split(err[0].split("to resume: explainprune ")[1])) == 0
    assert count.calls == 1 and len(json.loads((out / "report.json").read_text())["samples"]) == 3


def test_unreadable_image_stops_or_is_skipped(qwen, manifest, tmp_path):  # noqa: F811
    def broken(rows):
        rows[1] = {**rows[1], "image": str(tmp_path / "broken.png")}
        return rows

    (tmp_path / "broken.png").write_bytes(truncated_png())  # its header reads: found when decoded
    path = with_answers(manifest, tmp_path, broken)
    with pytest.raises(InputError, match=r"m.jsonl:2: sample s1: cannot read its media"):
        run_eval(qwen, ManifestSource(path), EvalConfig(**CONFIG))
    rep = run_eval(qwen, ManifestSource(path), EvalConfig(**CONFIG), on_error="skip")
    assert [(e["id"], e["line"]) for e in rep.skipped] == [("s1", 2)]
    assert {s.id for s in rep.samples} == {"s0", "s2"}
    assert "1 samples skipped (unreadable media)" in rep.to_markdown()
    assert Report.from_json(rep.to_json()).skipped == rep.skipped


def test_report_files_are_replaced_atomically(qwen, manifest, tmp_path, monkeypatch):  # noqa: F811
    from explainprune.evaluation.plots import save_plots

    rep = run_eval(qwen, ManifestSource(manifest), EvalConfig(**CONFIG))
    paths = rep.save(tmp_path)
    paths.update(save_plots(rep, tmp_path))
    before = {k: p.read_bytes() for k, p in paths.items()}
    real = pathlib.Path.write_text

    def torn(self, text, *a, **k):  # killed half-way through writing any file
        real(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        rep.save(tmp_path)
    monkeypatch.undo()
    import matplotlib.figure

    def torn_png(self, fname, *a, **k):
        pathlib.Path(fname).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_png)
    with pytest.raises(KeyboardInterrupt):
        save_plots(rep, tmp_path)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
