"""What an output folder may hold and who may write it (issue 21, items 3-4 and its weak errors): eval refuses
another evaluation's --out (--overwrite replaces it), one run per --out at a time (a lock naming the running
one), no empty --out left by an early error, index.json shard paths kept inside --labels, records.jsonl
lines without a sample, a full disk named, `--device cuda` on a CPU torch, no argparse abbreviations."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import explainprune
import explainprune.models
from explainprune.cli.main import main
from explainprune.labels import LabelConfig, label, read_index
from explainprune.outdir import LOCK_NAME, out_lock
from explainprune.testing import image_manifest
from test_labels import FakeVLM, SyntheticSource, synthetic_labeler  # tests/ is on sys.path (its conftest.py)

SRC = str(Path(explainprune.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return image_manifest(d, 3)


def one_error(capsys, cmd):
    bars = ("Loading weights", "Writing model shards")  # transformers' bars on stderr
    err = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith(bars)]
    assert len(err) == 1 and err[0].startswith(f"explainprune {cmd}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def eval_argv(model, data, out, *extra):
    return ["eval", "--model", str(model), "--task", str(data), "--methods", "vanilla", "uniform", "--ratios", "0.5",
            "--max-new-tokens", "2", "--out", str(out), "--no-progress", *extra]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# -- item 3: eval into another evaluation's --out ------------------------------------------------------------
def test_eval_refuses_another_evaluation_unless_overwrite(tiny_dirs, data, tmp_path, capsys, monkeypatch):
    model, out = tiny_dirs("qwen2_vl"), tmp_path / "e"
    assert main(eval_argv(model, data, out)) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert {"records.jsonl", "report.json", "report.md", "preservation_vs_retention.png"} <= set(before)
    assert main(eval_argv(model, data, out, "--ratios", "0.25", "--no-plots")) == 2
    err = one_error(capsys, "eval")
    assert f"{out}: holds the records of another evaluation (differs in config.ratios ([0.5] recorded, now " \
           "[0.25]))" in err and "pass --overwrite to replace it" in err
    assert snapshot(out) == before
    assert main(eval_argv(model, data, out, "--ratios", "0.25", "--no-plots", "--overwrite")) == 0
    after = snapshot(out)
    assert not [n for n in after if n.endswith(".png")]  # the other evaluation's plots went with it
    assert {s["ratio"] for s in json.loads(after["report.json"])["samples"]} == {1.0, 0.25}
    (out / "records.jsonl").unlink()  # a report without its records: whose is it? refused too
    assert main(eval_argv(model, data, out, "--ratios", "0.25", "--no-plots")) == 2
    assert "holds the report of another evaluation (report.json without its records.jsonl)" in one_error(capsys,
                                                                                                        "eval")


def test_commands_refuse_another_commands_out(no_model, data, tmp_path, capsys):
    labels = tmp_path / "labels"
    label(FakeVLM(), SyntheticSource(4), labels, LabelConfig(shard_size=2), labeler=synthetic_labeler(),
          progress=False)
    before = snapshot(labels)
    assert main(["eval", "--task", str(data), "--out", str(labels)]) == 2
    assert f"--out {labels} holds a label set (written by `explainprune label`); choose another --out" in \
        one_error(capsys, "eval")
    assert main(["train", "--labels", str(labels), "--out", str(labels)]) == 2
    assert "holds a label set" in one_error(capsys, "train")
    assert snapshot(labels) == before
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "records.jsonl").write_text("{}\n")
    assert main(["label", "--model", "demo", "--manifest", str(data), "--out", str(tmp_path / "ev")]) == 2
    assert "holds an evaluation (written by `explainprune eval`)" in one_error(capsys, "label")


# -- item 4: one run per --out ------------------------------------------------------------------------------
SLOW_EVAL = textwrap.dedent("""
    import sys, time
    import explainprune.evaluation.runner as runner
    real = runner.run_one
    def slow(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)
    runner.run_one = slow
    from explainprune.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def test_two_evals_on_one_out_do_not_interleave(tiny_dirs, data, tmp_path, capsys):
    model, out = tiny_dirs("qwen2_vl"), tmp_path / "e"
    argv = eval_argv(model, data, out, "--no-plots")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", SLOW_EVAL, *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (out / "records.jsonl").is_file():  # the first run is evaluating (3 samples, >= 3 s)
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert main(argv) == 2
        err = one_error(capsys, "eval")
        assert err.startswith(f"explainprune eval: error: --out {out} is in use by another run (pid {first.pid}: "
                              f"explainprune eval --model {model} ")
        assert err.endswith("); wait for it to finish, or choose another --out")
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and [json.loads(x).get("sample") for x in lines] == [None, 0, 1, 2]
    assert not (out / LOCK_NAME).exists()  # released and removed on exit


HOLD = textwrap.dedent("""
    import sys, time
    from explainprune.outdir import out_lock
    with out_lock(sys.argv[1], "explainprune label --out held"):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("cmd", ["label", "train", "demo"])
def test_a_locked_out_is_refused_naming_the_holder(no_model, data, tmp_path, capsys, cmd):
    out = tmp_path / "o"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        labels = tmp_path / "labels"
        label(FakeVLM(), SyntheticSource(4), labels, LabelConfig(shard_size=2), labeler=synthetic_labeler(),
              progress=False)
        argv = {"label": ["label", "--model", "demo", "--manifest", str(data), "--out", str(out)],
                "train": ["train", "--labels", str(labels), "--out", str(out), "--epochs", "1"],
                "demo": ["demo", "--quick", "--out", str(out)]}[cmd]
        assert main(argv) == 2
        assert one_error(capsys, cmd) == (f"explainprune {cmd}: error: --out {out} is in use by another run "
                                          f"(pid {holder.pid}: explainprune label --out held); wait for it to "
                                          "finish, or choose another --out")
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, but the lock went with the process
    assert (out / LOCK_NAME).read_text().startswith(f"pid {holder.pid}: ")
    with out_lock(out, "next"):
        assert (out / LOCK_NAME).read_text() == f"pid {os.getpid()}: next\n"
    assert not (out / LOCK_NAME).exists()


# -- weak errors --------------------------------------------------------------------------------------------
def test_no_empty_out_left_after_an_early_error(data, tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"  # (label and eval find it missing before loading; demo at load)
    for cmd, argv in (("label", ["label", "--model", str(missing), "--manifest", str(data)]),
                      ("eval", ["eval", "--model", str(missing), "--task", str(data)]),
                      ("demo", ["demo", "--model", str(missing), "--quick"])):
        out = tmp_path / "new" / "deeper" / cmd
        assert main([*argv, "--out", str(out)]) == 2
        assert f"no checkpoint directory at {missing}" in one_error(capsys, cmd)
        assert not (tmp_path / "new").exists(), cmd
    labels = tmp_path / "labels"  # a label set too small to train: refused after --out was made
    label(FakeVLM(), SyntheticSource(1), labels, LabelConfig(), labeler=synthetic_labeler(), progress=False)
    assert main(["train", "--labels", str(labels), "--out", str(tmp_path / "new" / "f")]) == 2
    assert "training needs at least 2" in one_error(capsys, "train")
    assert not (tmp_path / "new").exists()


def test_index_shard_paths_outside_the_labels_are_refused(tmp_path, capsys):
    labels, other = tmp_path / "labels", tmp_path / "other"
    for d, n in ((labels, 12), (other, 8)):
        label(FakeVLM(), SyntheticSource(n), d, LabelConfig(shard_size=4), labeler=synthetic_labeler(),
              progress=False)
    index = json.loads((labels / "index.json").read_text())
    index["shards"][0]["file"] = "../other/shards/00001.parquet"  # a real shard, with its real SHA-256
    index["shards"][0]["sha256"] = read_index(other)["shards"][1]["sha256"]
    (labels / "index.json").write_text(json.dumps(index))
    assert main(["train", "--labels", str(labels), "--out", str(tmp_path / "f"), "--epochs", "1"]) == 2
    assert one_error(capsys, "train") == (
        f"explainprune train: error: {labels / 'index.json'}: shard 0 points outside the label folder "
        "('../other/shards/00001.parquet'); index.json was edited or damaged: delete it and rerun `explainprune "
        "label` with the same arguments to rebuild it")
    index["shards"][0]["file"] = str(other / "shards" / "00001.parquet")
    (labels / "index.json").write_text(json.dumps(index))
    assert main(["train", "--labels", str(labels), "--out", str(tmp_path / "f"), "--epochs", "1"]) == 2
    assert "points outside the label folder" in one_error(capsys, "train")
    assert not (tmp_path / "f").exists()


def test_train_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    labels = tmp_path / "labels"
    label(FakeVLM(), SyntheticSource(8), labels, LabelConfig(shard_size=4), labeler=synthetic_labeler(),
          progress=False)
    out = tmp_path / "f"
    assert main(["train", "--labels", str(labels), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--resume", "--no-progress"]) == 0
    notes = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith(("guard:", "warning:"))]
    assert notes == [f"explainprune train: note: --resume: {out} holds no checkpoint to resume; training from epoch 1"]
    assert main(["train", "--labels", str(labels), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                 "--resume", "--no-progress"]) == 0
    assert "note" not in capsys.readouterr().err


def test_records_line_without_sample_is_named(tiny_dirs, data, tmp_path, capsys):
    model, out = tiny_dirs("qwen2_vl"), tmp_path / "e"
    assert main(eval_argv(model, data, out, "--no-plots")) == 0
    capsys.readouterr()
    lines = (out / "records.jsonl").read_text().splitlines()
    broken = [lines[0], lines[1], json.dumps({"records": json.loads(lines[2])["records"]}), lines[3]]
    (out / "records.jsonl").write_text("".join(x + "\n" for x in broken))
    assert main(eval_argv(model, data, out, "--no-plots")) == 2
    assert one_error(capsys, "eval") == (
        f"explainprune eval: error: {out / 'records.jsonl'}: line 3 is not a finished sample's record (no 'sample' "
        "number in 0..2 with its 'records'); the file was edited or damaged: delete that line (its sample is "
        "redone), or pass --overwrite to start over")
    del broken[2]
    (out / "records.jsonl").write_text("".join(x + "\n" for x in broken))
    assert main(eval_argv(model, data, out, "--no-plots")) == 0  # the deleted line's sample is redone
    assert {s["id"] for s in json.loads((out / "report.json").read_text())["samples"]} == {"s0", "s1", "s2"}


def test_a_full_disk_is_named(tiny_dirs, data, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    out = tmp_path / "l"
    argv = ["label", "--model", str(tiny_dirs("qwen2_vl")), "--manifest", str(data), "--out", str(out),
            "--keep-wrong", "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 2
    assert one_error(capsys, "label") == (
        f"explainprune label: error: the disk is full: could not write {out / 'shards' / '00000.parquet'}; free "
        "some space and rerun the same command (finished work is kept and resumed)")
    assert not list((out / "shards").glob(".*"))  # no temp file left
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", full)
    assert main(eval_argv(tiny_dirs("qwen2_vl"), data, tmp_path / "e", "--no-plots")) == 2
    assert one_error(capsys, "eval").startswith(
        f"explainprune eval: error: the disk is full: could not write {tmp_path / 'e' / 'records.jsonl'}; ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line_before_loading(no_model, data, tmp_path, capsys):
    what = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
    for cmd, argv in (("label", ["label", "--model", "demo", "--manifest", str(data)]),
                      ("eval", ["eval", "--task", str(data)]),
                      ("train", ["train", "--labels", str(tmp_path)]),
                      ("demo", ["demo", "--quick"])):
        assert main([*argv, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert f"error: --device cuda: this torch ({torch.__version__}) {what}; use --device cpu" in \
            one_error(capsys, cmd)
    assert main(["eval", "--task", str(data), "--out", str(tmp_path / "o"), "--device-map", "cuda:1"]) == 2
    assert "--device-map cuda:1: this torch" in one_error(capsys, "eval")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["eval", "--task", "digits", "--max-pix", "1000"],
    ["label", "--model", "demo", "--task", "digits", "--out", "x", "--shard", "4"],
    ["train", "--labels", "l", "--out", "x", "--epoch", "3"],
    ["--deb", "flops", "--visual-tokens", "4"],
])
def test_abbreviated_options_are_refused(no_model, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    from explainprune.cli.common import check_device
    from explainprune.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    check_device("cuda")
    with pytest.raises(InputError, match=r"^--device cuda:3: only 2 CUDA GPUs visible \(cuda:0..cuda:1\); give an"):
        check_device("cuda:3")


def test_every_parser_refuses_abbreviations():
    import argparse

    from explainprune.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert not parser.allow_abbrev and sub.choices and not [n for n, p in sub.choices.items() if p.allow_abbrev]
    with pytest.raises(SystemExit):
        from explainprune.tasks.digits import main as digits_main

        digits_main(["export", "--di", "x"])


def test_a_records_file_that_is_not_records(tmp_path):
    from explainprune.errors import InputError
    from explainprune.evaluation.records import _records_header, check_records
    from explainprune.evaluation.runner import EvalConfig

    header, path = _records_header("m", {}, EvalConfig(), 3), tmp_path / "records.jsonl"
    path.write_text("hello\n")
    with pytest.raises(InputError, match=r"records.jsonl: line 1 is not the header of explainprune eval records"):
        check_records(path, header)
    assert check_records(path, header, overwrite=True) is False
    path.write_text('{"format": "explainprune-eval-rec')  # torn while its header was written: nothing to keep
    assert check_records(path, header) is False
    path.write_text(json.dumps(header) + "\n")
    assert check_records(path, header) is True
