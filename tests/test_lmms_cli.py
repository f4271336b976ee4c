"""The real lmms-eval CLI on the shipped demo model and the digits task (needs lmms-eval: `make test` installs
the extra): for vanilla, learned and fastv, the accuracy lmms-eval reports equals `explainprune eval` on the
same 40 samples, prediction by prediction, and the efficiency file holds eval's numbers. lmms-eval exits 0
even when evaluation fails, so every check reads the files it wrote."""

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


# one bad run here (each lmms-eval run indexes its ~340 task folders first); tests/test_lmms_model.py checks
# the other bad model_args through lmms-eval's own create_from_arg_string
BAD = {"unknown": ("method=fastvv,ratio=0.25", "unknown pruner 'fastvv'. did you mean 'fastv'?")}


def _env(tmp) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(tasks, out, model_args: str, limit: int = N) -> dict[str, object]:
    return {"model": "explainprune", "model_args": model_args, "tasks": "explainprune_digits",
            "include_path": str(tasks), "limit": limit, "device": "cpu", "output_path": str(out), "log_samples": True}


def _start(argv: list[str], tmp) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmms_eval", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(tmp))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lmms-eval on the first 40 digits test samples: vanilla, fastv and a bad model_args in one process
    (a ``--config`` list: each run is caught and logged on its own), learned with the flags on the command line
    once a quick compressor is trained (labels on 16 train samples, 3 epochs); meanwhile `explainprune eval`
    on the same samples."""
    import explainprune
    from explainprune.evaluation.runner import EvalConfig, run_eval
    from explainprune.integrations.lmms_eval.task import write_task
    from explainprune.labels import DigitsSource, LabelConfig, label
    from explainprune.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("lmms")
    tasks = tmp / "tasks"
    write_task(tasks, n=N)
    configs = [_args(tasks, tmp / m, f"pretrained=demo,method={m},ratio={RATIO}") for m in ("vanilla", "fastv")]
    configs += [_args(tasks, tmp / f"bad_{k}", f"pretrained=demo,{a}", limit=2) for k, (a, _) in BAD.items()]
    (tmp / "runs.yaml").write_text(json.dumps(configs))  # JSON is YAML
    first = _start(["--config", str(tmp / "runs.yaml")], tmp)
    vlm = explainprune.load("demo")
    label(vlm, DigitsSource(split="train", n=16), tmp / "labels", LabelConfig(), progress=False)
    train(tmp / "labels", tmp / "run", TrainConfig(epochs=3), progress=False)
    compressor = tmp / "run" / "compressor"
    a = _args(tasks, tmp / "learned", f"pretrained=demo,method=learned,ratio={RATIO},compressor={compressor}")
    second = _start([f"--{k}" if v is True else f"--{k}={v}" for k, v in a.items()], tmp)
    config = EvalConfig(methods=METHODS, ratios=(RATIO,), progress=False,
                        method_options={"learned": {"compressor": str(compressor)}})
    report = run_eval(vlm, DigitsSource(split="test", n=N), config)
    logs = {"first": first.communicate(timeout=900)[0], "learned": second.communicate(timeout=900)[0]}
    return tmp, report, logs


def _files(folder):
    (results,) = folder.glob("demo/*_results.json")
    (samples,) = folder.glob("demo/*_samples_explainprune_digits.jsonl")
    (efficiency,) = folder.glob("demo/*_explainprune_efficiency.json")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(results.read_text()), rows, json.loads(efficiency.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_lmms_eval_equals_explainprune_eval(runs, method):
    tmp, report, logs = runs
    results, samples, eff = _files(tmp / method)
    records = [r for r in report.samples if r.method == method]
    assert len(records) == len(samples) == N
    assert [s["filtered_resps"] for s in samples] == [r.prediction for r in records]
    assert [s["exact_match"] for s in samples] == [float(r.correct) for r in records]
    accuracy = results["results"]["explainprune_digits"]["exact_match,none"]
    expected = next(r.accuracy for r in report.results if r.method == method)
    assert accuracy == pytest.approx(expected) and 0 < accuracy
    mine = sorted(eff["samples"], key=lambda s: int(s["id"].split("/")[1]))
    for key in ("n_visual", "kept", "layer", "average_retention", "flops_llm", "flops_overhead", "kv_bytes"):
        assert [s[key] for s in mine] == [getattr(r, key) for r in records], key
    task = eff["tasks"]["explainprune_digits"]
    row = next(r for r in report.results if r.method == method)
    assert task["n"] == N and task["average_retention"] == pytest.approx(row.average_retention)
    assert task["flops"] == pytest.approx(row.flops) and task["kv_bytes"] == pytest.approx(row.kv_bytes)


def test_bad_model_args_take_lmms_eval_error_path(runs):
    """An unknown method: lmms-eval logs its error line with explainprune's message and writes no results."""
    tmp, _, logs = runs
    for kind, (_, message) in BAD.items():
        assert f"Error during evaluation: {message}" in logs["first"], logs["first"][-3000:]
        assert not list((tmp / f"bad_{kind}").glob("**/*_results.json"))
    assert logs["first"].count("Error during evaluation") == len(BAD) and "Error during" not in logs["learned"]
