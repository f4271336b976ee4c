"""benchmarks/gpu_check.sh, the one command of the GPU machine, run as its dry run on CPU (tiny shapes, the
bundle of `make gpu-bundle` installed into a temporary target), so the script itself cannot rot; and its
summary's parsing of pytest's junit XML and real_scale.py's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from explainprune.testing import script_module

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu-bundle"


@pytest.fixture(scope="module")
def check():
    return script_module(ROOT / "benchmarks" / "gpu_check.py", "gpu_check")


@pytest.mark.skipif(not list(BUNDLE.glob("transformers-*.whl")), reason="no .gpu-bundle (make gpu-bundle; "
                    "make test builds it)")
def test_dry_run_of_the_gpu_check(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)
    summary = (tmp_path / "summary.md").read_text()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "results.json", "summary.md"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [s["step"] for s in data["steps"]] == ["install", "env", "tests", "real_scale_7b", "real_scale_2b",
                                                  "real_scale_7b_long"]
    assert all(s["exit"] == 0 for s in data["steps"])
    assert data["tests"]["passed"] >= 10 and data["tests"]["failures"] == data["tests"]["errors"] == 0
    # the bundle's transformers is the one imported (first on PYTHONPATH), and the requirements hold
    assert "explainprune-site" in data["environment"]["transformers_file"]
    assert data["environment"]["requirement_problems"] == []
    assert set(data["runs"]) == {"real_scale_7b", "real_scale_2b", "real_scale_7b_long"}
    row = data["runs"]["real_scale_7b"]["rows"][0]
    assert set(row["ratios"]) == {"0.5", "0.25", "0.1"} and row["ratios"]["0.25"]["learned_kv_share"] < 1
    assert "relevance_s" in row and "label_per_min" in row
    assert len(data["targets"]) == 4 and "DRY RUN" in summary and "CUDA tests: " in summary


def test_summary_reads_failed_tests_and_targets(check, tmp_path):
    (tmp_path / "steps.tsv").write_text("install\t0\t3\ntests\t1\t40\nreal_scale_7b\t124\t120\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.gpu.test_cuda" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.gpu.test_cuda" name="test_b"><error message="y"/></testcase>'
        '<testcase classname="tests.gpu.test_cuda" name="test_c"/>'
        '<testcase classname="tests.gpu.test_cuda" name="test_d"><skipped/></testcase></testsuite></testsuites>')
    van = {"method": "vanilla", "ratio": 1.0, "s": 1.0, "kv_bytes": 1000}
    pre = [van] + [{"method": "learned", "ratio": r, "s": s, "kv_bytes": kv, "ideal_speedup": ideal}
                   for r, s, kv, ideal in ((0.5, 0.55, 600, 1.9), (0.25, 0.3, 290, 3.5), (0.1, 0.2, 150, 6.0))]
    result = {"setting": {"shape": "7b", "layers": 28, "dtype": "bfloat16"}, "environment": {"device": "H100"},
              "results": [{"visual_tokens": 1296, "prompt_tokens": 1340, "prefill": pre,
                           "learned_scoring": {"share_of_prefill": 0.004},
                           "relevance": {"s": 1.5, "peak_bytes": 2**30}}]}
    (tmp_path / "real_scale_7b.json").write_text(json.dumps(result))
    text, data = check.summarize(tmp_path, dry_run=False)
    assert data["tests"]["passed"] == 1 and data["tests"]["failed"] == ["tests.gpu.test_cuda::test_a",
                                                                          "tests.gpu.test_cuda::test_b"]
    verdicts = [t["verdict"] for t in data["targets"]]
    # scoring 0.4% met; 25%: 3.33x of 3.5x = 95% met; relevance 1.5 s not met; KV 29% met
    assert verdicts == ["met", "met", "NOT met", "met"]
    assert "124 (time limit)" in text and "1 passed, 2 failed, 1 skipped" in text


def test_wheels_this_python_cannot_take_are_named(check, tmp_path):
    (tmp_path / "pure-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "binary-1.0-cp27-cp27mu-manylinux1_x86_64.whl").write_bytes(b"")
    good, other = check.usable_wheels(tmp_path)
    assert [w.name for w in good] == ["pure-1.0-py3-none-any.whl"]
    assert [w.name for w in other] == ["binary-1.0-cp27-cp27mu-manylinux1_x86_64.whl"]
