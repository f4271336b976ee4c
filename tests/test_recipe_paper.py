"""recipes/paper/recipe.py composes valid `explainprune` commands with the paper's numbers."""

import importlib.util
import shlex
from pathlib import Path

import pytest

from explainprune.cli.main import build_parser

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "paper" / "recipe.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("paper_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_commands_parse_and_carry_the_papers_numbers(capsys):
    recipe = _recipe()
    argv = ["--model", "Qwen/Qwen2-VL-7B-Instruct", "--gpus", "8", "--out", "runs/paper",
            "--gpt4", "g.json", "--synthetic", "s1.json", "s2.json", "--image-root", "imm",
            "--llava-video", "lv.json", "--llava-video-root", "lv", "--nextqa", "nq.json", "--nextqa-root", "nq",
            "--activitynet", "an.json", "--activitynet-root", "an", "--dry-run"]
    assert recipe.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    parser = build_parser()
    parsed = []
    for line in lines:
        cmd = shlex.split(line)
        if cmd[0] == "torchrun":
            assert cmd[1] == "--nproc_per_node=8" and cmd[2:4] == ["-m", "explainprune.cli.main"]
            cmd = cmd[4:]
        else:
            cmd = cmd[1:]
        parsed.append(parser.parse_args(cmd))
    image, f_image, video, f_video = parsed
    assert image.dataset == ["g.json", "s1.json", "s2.json"] and image.target == [9000, 2000, 2000]
    assert image.media_root == ["imm"] * 3 and image.match == "auto" and image.strata == "task"
    assert video.target == [7000, 6000, 4000] and video.strata == "task,duration" and video.max_frames == 8
    assert video.media_root == ["lv", "nq", "an"]
    for f in (f_image, f_video):
        assert f.epochs == 100 and f.batch_size == 128 and f.lr == 1e-3  # Adam's default rate


def test_recipe_needs_media_roots_and_data():
    recipe = _recipe()
    with pytest.raises(SystemExit, match="--nextqa-root"):
        recipe.main(["--model", "m", "--out", "o", "--nextqa", "nq.json", "--dry-run"])
    with pytest.raises(SystemExit, match="at least one dataset"):
        recipe.main(["--model", "m", "--out", "o", "--dry-run"])
