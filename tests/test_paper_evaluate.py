"""recipes/paper/evaluate.py: the paper's evaluation commands (parsed from --dry-run for Qwen2-VL-7B and
LLaVA-OneVision-7B with the paper's settings), the FastV layer that reproduces the paper's FLOPs, and an end-to-end
run of the same script on the demo model with the digits tasks through the real lmms-eval CLI, rendering a
paper-shaped table."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.paper import evaluate

ROOT = Path(__file__).resolve().parent.parent


def dry(*argv: str, capsys) -> list[list[str]]:
    assert evaluate.main([*argv, "--dry-run"]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


def model_args(cmd: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in cmd[cmd.index("--model_args") + 1].split(","))


def test_qwen2_vl_commands_follow_the_paper(capsys):
    cmds = dry("--model", "Qwen/Qwen2-VL-7B-Instruct", "--out", "o", "--compressor-image", "fi",
               "--compressor-video", "fv", "--gpus", "8", capsys=capsys)
    runs = {(model_args(c)["method"], model_args(c).get("ratio"), "videomme" in c[c.index("--tasks") + 1]): c
            for c in cmds}
    assert all(c[:4] == ["accelerate", "launch", "--num_processes", "8"] for c in cmds)
    # every method at its ratios: vanilla, R_v (Table 1), FastV and learned (Tables 2-3; 10% on videos only)
    assert set(runs) == {("vanilla", None, False), ("vanilla", None, True)} | {
        ("oracle", r, v) for r in ("0.5", "0.25") for v in (False, True)} | {
        (m, r, False) for m in ("fastv", "learned") for r in ("0.5", "0.25")} | {
        (m, r, True) for m in ("fastv", "learned") for r in ("0.5", "0.25", "0.1")}
    image, video = runs[("learned", "0.25", False)], runs[("learned", "0.25", True)]
    assert model_args(image) == {"pretrained": "Qwen/Qwen2-VL-7B-Instruct", "method": "learned", "ratio": "0.25",
                                 "compressor": "fi", "dtype": "bfloat16", "max_pixels": str(12845056 // 2)}
    assert model_args(video)["max_pixels"] == str(384 * 28 * 28) and model_args(video)["max_frames"] == "32"
    assert model_args(video)["compressor"] == "fv"
    assert image[image.index("--tasks") + 1] == "mme,mmstar,seedbench"  # MMVet needs a judge: not without --judge
    assert video[video.index("--tasks") + 1] == "videomme,mvbench,nextqa_mc_test,nextqa_oe_test"
    assert model_args(runs[("fastv", "0.25", True)])["layer"] == "3"   # "the 4-th layer"
    judged = dry("--model", "Qwen/Qwen2-VL-7B-Instruct", "--out", "o", "--judge", "--tables", "2", capsys=capsys)
    assert all("mmvet" in c[c.index("--tasks") + 1] for c in judged)


def test_llava_onevision_commands(capsys):
    cmds = dry("--model", "lmms-lab/llava-onevision-qwen2-7b-ov", "--out", "o", capsys=capsys)
    for c in cmds:
        a = model_args(c)
        assert "max_pixels" not in a and c[0] == sys.executable
        assert a.get("max_frames") == ("32" if "videomme" in c[c.index("--tasks") + 1] else None)
    assert len(cmds) == 16


def test_fastv_layer_reproduces_the_papers_flops():
    assert evaluate.fastv_layer_for_paper("qwen2_vl") == 3 == evaluate.fastv_layer_for_paper("llava_onevision")
    # Table 7: Qwen2-VL 9.6 T vanilla, FastV 25% 3.1 T, ours 2.4 T; LLaVA-OneVision 12.9 / 4.2 / 3.1
    for family, want in (("qwen2_vl", (9.6, 3.1, 2.4)), ("llava_onevision", (12.9, 4.2, 3.1))):
        got = [evaluate.flops_t(family, "image", m, r, 3) for m, r in (("vanilla", 1.0), ("fastv", .25),
                                                                       ("learned", .25))]
        assert [round(x, 1) for x in got] == list(want), family


@pytest.mark.skipif(not __import__("importlib").util.find_spec("lmms_eval"), reason="needs lmms-eval")
def test_end_to_end_on_the_demo_model(tmp_path):
    from explainprune.integrations.lmms_eval.task import write_task

    write_task(tmp_path / "tasks", n=4)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    argv = [sys.executable, str(ROOT / "recipes" / "paper" / "evaluate.py"), "--model", "demo", "--benchmarks",
            "digits", "--tables", "1", "--ratios", "0.25", "--limit", "4", "--device", "cpu", "--dtype", "float32",
            "--include-path", str(tmp_path / "tasks"), "--out", str(tmp_path / "out")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "out" / "tables.md").read_text()
    data = json.loads((tmp_path / "out" / "tables.json").read_text())
    assert "## Table 1" in table and "| oracle | 25% |" in table and "digits image" in table
    for key in ("table1/vanilla/1/digits image", "table1/oracle/0.25/digits video"):
        assert 0.0 <= data[key]["ours"] <= 100.0 and data[key]["paper"] is None
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)  # resumes: nothing rerun
    assert again.returncode == 0 and again.stdout.count("done already") == 4
