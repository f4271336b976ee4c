"""The real lmms-eval CLI on the shipped demo model and the digits task (needs lmms-eval: `make test` installs
the extra): for vanilla, learned and fastv, the accuracy lmms-eval reports equals `explainprune eval` on the
same 40 samples, prediction by prediction, and the efficiency file holds eval's numbers; a mixed
generate + multiple-choice run writes both; a bad model argument stops lmms-eval with a non-zero exit.
lmms-eval exits 0 even when evaluation fails, so every check reads the files it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("av")

N = 40
RATIO = 0.25
METHODS = ("vanilla", "learned", "fastv")


MIXED = "explainprune_digits,explainprune_digits_mc"


def _env(tmp) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(tasks, out, model_args: str, limit: int = N, names: str = "explainprune_digits") -> dict[str, object]:
    return {"model": "explainprune", "model_args": model_args, "tasks": names,
            "include_path": str(tasks), "limit": limit, "device": "cpu", "output_path": str(out), "log_samples": True}


def _start(argv: list[str], tmp) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmms_eval", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(tmp))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lmms-eval on the first 40 digits test samples: vanilla, and fastv on the generate and multiple-choice
    tasks together, in one process (a ``--config`` list); learned with the flags on the command line once a
    quick compressor is trained (labels on 16 train samples, 3 epochs; given as the training run folder);
    a run whose efficiency_out is a file; meanwhile `explainprune eval` on the same samples and the
    engine's multiple-choice scores."""
    import explainprune
    from explainprune.evaluation.runner import EvalConfig, run_eval
    from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request
    from explainprune.integrations.lmms_eval.task import CHOICES, doc_to_visual, write_task
    from explainprune.labels import DigitsSource, LabelConfig, label
    from explainprune.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("lmms")
    tasks = tmp / "tasks"
    write_task(tasks, n=N)
    configs = [_args(tasks, tmp / "vanilla", "pretrained=demo,method=vanilla"),
               _args(tasks, tmp / "fastv", f"pretrained=demo,method=fastv,ratio={RATIO}", names=MIXED)]
    (tmp / "runs.yaml").write_text(json.dumps(configs))  # JSON is YAML
    first = _start(["--config", str(tmp / "runs.yaml")], tmp)
    (tmp / "a_file").write_text("")
    bad = _start([f"--{k}" if v is True else f"--{k}={v}" for k, v in _args(
        tasks, tmp / "bad", f"pretrained=demo,method=fastv,ratio={RATIO},efficiency_out={tmp / 'a_file'}",
        limit=2).items()], tmp)
    vlm = explainprune.load("demo")
    label(vlm, DigitsSource(split="train", n=16), tmp / "labels", LabelConfig(), progress=False)
    train(tmp / "labels", tmp / "run", TrainConfig(epochs=3), progress=False)
    a = _args(tasks, tmp / "learned", f"pretrained=demo,method=learned,ratio={RATIO},compressor={tmp / 'run'}")
    second = _start([f"--{k}" if v is True else f"--{k}={v}" for k, v in a.items()], tmp)
    config = EvalConfig(methods=METHODS, ratios=(RATIO,), progress=False,
                        method_options={"learned": {"compressor": str(tmp / "run" / "compressor")}})
    report = run_eval(vlm, DigitsSource(split="test", n=N), config)
    docs = [json.loads(line) for line in (tasks / "data" / "all.jsonl").read_text().splitlines()]
    engine = PrunedEngine(vlm, "fastv", RATIO, warmup=False)
    mc = [engine.score([Request(d["question"], doc_to_visual(d, tasks / "data"), task="mc", doc_id=i,
                                continuation=c) for c in CHOICES]) for i, d in enumerate(docs)]
    logs = {"first": first.communicate(timeout=900)[0], "learned": second.communicate(timeout=900)[0],
            "bad": bad.communicate(timeout=900)[0]}
    return tmp, report, logs, {"mc": mc, "bad_rc": bad.returncode}


def _files(folder):
    (results,) = folder.glob("demo/*_results.json")
    (samples,) = folder.glob("demo/*_samples_explainprune_digits.jsonl")
    (efficiency,) = folder.glob("demo/*_explainprune_efficiency.json")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(results.read_text()), rows, json.loads(efficiency.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_lmms_eval_equals_explainprune_eval(runs, method):
    tmp, report, logs, _ = runs
    results, samples, eff = _files(tmp / method)
    records = [r for r in report.samples if r.method == method]
    assert len(records) == len(samples) == N
    assert [s["filtered_resps"] for s in samples] == [r.prediction for r in records]
    assert [s["exact_match"] for s in samples] == [float(r.correct) for r in records]
    accuracy = results["results"]["explainprune_digits"]["exact_match,none"]
    expected = next(r.accuracy for r in report.results if r.method == method)
    assert accuracy == pytest.approx(expected) and 0 < accuracy
    mine = sorted((s for s in eff["samples"] if s["task"] == "explainprune_digits"),
                  key=lambda s: int(s["id"].split("/")[1]))
    for key in ("n_visual", "kept", "layer", "average_retention", "flops_llm", "flops_overhead", "kv_bytes"):
        assert [s[key] for s in mine] == [getattr(r, key) for r in records], key
    task = eff["tasks"]["explainprune_digits"]
    row = next(r for r in report.results if r.method == method)
    assert task["n"] == N and task["average_retention"] == pytest.approx(row.average_retention)
    assert task["flops"] == pytest.approx(row.flops) and task["kv_bytes"] == pytest.approx(row.kv_bytes)


def test_mixed_generate_and_multiple_choice_run(runs):
    """One run with a generate_until and a multiple_choice task writes both results; each document's ten option
    losses are the engine's (mean NLL per token, the pruned context), and lmms-eval's acc picks the argmin."""
    tmp, _, logs, extra = runs
    (results,) = (tmp / "fastv").glob("demo/*_results.json")
    (samples,) = (tmp / "fastv").glob("demo/*_samples_explainprune_digits_mc.jsonl")
    res = json.loads(results.read_text())["results"]
    assert res["explainprune_digits"]["exact_match,none"] > 0.5, logs["first"][-3000:]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert len(rows) == N
    for row, scores in zip(rows, extra["mc"]):
        losses = [float(loss) for loss, _ in row["filtered_resps"]]
        assert losses == pytest.approx([s.loss for s in scores], abs=1e-4)
        assert row["acc"] == float(min(range(10), key=losses.__getitem__) == int(row["target"]))
    expected = sum(r["acc"] for r in rows) / N
    assert res["explainprune_digits_mc"]["acc,none"] == pytest.approx(expected) and expected > 0.5
    (eff,) = (tmp / "fastv").glob("demo/*_explainprune_efficiency.json")
    tasks = json.loads(eff.read_text())["tasks"]
    assert tasks["explainprune_digits_mc"]["n"] == N and tasks["explainprune_digits"]["n"] == N


def test_bad_model_args_exit_non_zero(runs):
    """An unwritable efficiency_out stops lmms-eval when the model is built: one explainprune line, a
    non-zero exit and no results (lmms-eval turns other exceptions into exit 0)."""
    tmp, _, logs, extra = runs
    assert extra["bad_rc"] != 0, logs["bad"][-3000:]
    assert f"explainprune lmms-eval model: error: efficiency_out {tmp / 'a_file'} is a file" in logs["bad"]
    assert "Traceback" not in logs["bad"] and not list((tmp / "bad").glob("**/*_results.json"))
    assert "Error during" not in logs["first"] + logs["learned"]
