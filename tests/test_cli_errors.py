"""Bad input through the command line: one `explainprune <cmd>: error: ...` line naming the file / line /
sample, before any model loads; Ctrl-C says what was kept and how to resume; --debug shows tracebacks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import explainprune
import explainprune.models
from explainprune.cli.main import main
from explainprune.compressor import Compressor, CompressorConfig
from explainprune.errors import InputError
from explainprune.pruning import available, get_pruner
from explainprune.pruning.base import select
from explainprune.testing import random_image


def one_error_line(capsys, cmd: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"explainprune {cmd}: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def data(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    rows = [{"id": "x0", "question": "q ?", "answer": ["9", "nine"], "image": "a.png"},
            {"id": "x1", "question": "q ?", "answer": 7, "image": "a.png"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_label_and_eval_refuse_non_positive_limits(no_model, data, tmp_path, capsys, limit):
    assert main(["label", "--model", "demo", "--manifest", str(data), "--limit", limit, "--out",
                 str(tmp_path / "o")]) == 2
    one_error_line(capsys, "label", "--limit must be a positive number")
    assert main(["label", "--model", "demo", "--task", "digits", "--limit", limit, "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "label", "--limit must be a positive number")
    assert main(["eval", "--task", str(data), "--limit", limit, "--out", str(tmp_path / "e")]) == 2
    one_error_line(capsys, "eval", "--limit must be a positive number")
    assert not (tmp_path / "o" / "index.json").exists()


def test_empty_question_and_bad_answer_fail_at_validation(no_model, data, tmp_path, capsys):
    bad = write_rows(tmp_path / "bad.jsonl", [{"id": "x0", "question": "q", "answer": "1", "image": "a.png"},
                                               {"id": "x1", "question": " ", "answer": "1", "image": "a.png"}])
    for cmd in (["label", "--model", "demo", "--manifest"], ["eval", "--task"]):
        assert main([*cmd, str(bad), "--out", str(tmp_path / "o")]) == 2
        one_error_line(capsys, cmd[0], f"{bad}:2: sample x1: question is empty")
    write_rows(bad, [{"id": "x0", "question": "q", "answer": {"a": 1}, "image": "a.png"}])
    assert main(["eval", "--task", str(bad), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "eval", f"{bad}:1: sample x0: answer must be a string, a number or a list")


def test_missing_image_named_before_the_model_loads(no_model, tmp_path, capsys):
    random_image(0).save(tmp_path / "a.png")
    m = write_rows(tmp_path / "m.jsonl", [{"question": "q", "answer": "1", "image": "a.png"},
                                          {"id": "v", "question": "q", "answer": "1", "video": "clip.mp4"}])
    assert main(["label", "--model", "demo", "--manifest", str(m), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "label", f"{m}:2: sample v: no file {tmp_path / 'clip.mp4'}")


def test_out_that_is_a_file_or_full_is_refused_first(no_model, data, tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["label", "--model", "demo", "--manifest", str(data), "--out", str(f)]) == 2
    one_error_line(capsys, "label", f"--out {f} is a file, not a folder")
    assert main(["eval", "--task", str(data), "--out", str(f)]) == 2
    one_error_line(capsys, "eval", "is a file, not a folder")
    assert main(["train", "--labels", str(tmp_path / "nolabels"), "--out", str(f)]) == 2
    one_error_line(capsys, "train", "no complete label set")
    assert main(["show", "--model", "demo", "--image", str(tmp_path / "a.png"), "--question", "q", "--out",
                 str(tmp_path)]) == 2
    one_error_line(capsys, "show", "is a folder, not a file name")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["eval", "--task", str(data), "--out", str(tmp_path / "e")]) == 2
    one_error_line(capsys, "eval", "has only 1 MiB free")


def test_unwritable_out_is_refused(no_model, data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--task", str(data), "--out", str(tmp_path / "file" / "x")]) == 2  # under a file
    one_error_line(capsys, "eval", "cannot write to --out", "Not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["label", "--model", "demo", "--manifest", str(data), "--out", str(ro / "x")]) == 2
        one_error_line(capsys, "label", "cannot write to --out")


@pytest.mark.parametrize("args, needle", [
    (["--ratios", "1.5"], "ratios must be in (0, 1]"),
    (["--ratios", "0"], "ratios must be in (0, 1]"),
    (["--methods", "fastv:layer=abc"], "option layer must be int; got 'abc'"),
    (["--methods", "fastv:layer=0"], "layer K must be an integer >= 1"),
    (["--methods", "random:seed=1.5"], "option seed must be int"),
    (["--methods", "fastvv"], "did you mean 'fastv'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_eval_options_checked_before_loading(no_model, data, tmp_path, capsys, args, needle):
    assert main(["eval", "--task", str(data), "--out", str(tmp_path / "e"), *args]) == 2
    one_error_line(capsys, "eval", needle)


def test_flops_checks(tmp_path, capsys):
    base = ["flops", "--visual-tokens", "10", "--intermediate", "8", "--layers", "2"]
    assert main([*base, "--hidden", "-4"]) == 2
    one_error_line(capsys, "flops", "--hidden must be >= 1; got -4")
    assert main([*base, "--hidden", "4", "--method", "fastv", "--fastv-layer", "2"]) == 2
    one_error_line(capsys, "flops", "--fastv-layer must be in 1..1")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert main(["flops", "--visual-tokens", "10", "--model", str(tmp_path)]) == 2
    one_error_line(capsys, "flops", "config.json: model_type 'bert' is not a supported multimodal model")
    (tmp_path / "config.json").write_text("{broken")
    assert main(["flops", "--visual-tokens", "10", "--model", str(tmp_path)]) == 2
    one_error_line(capsys, "flops", "config.json: not valid JSON")


def test_select_and_pruners_take_numpy_and_0d_ratios(load_tiny):
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    for r in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5)):
        assert select(scores, r).tolist() == [1, 2]
    for bad in (np.array([0.5]), torch.tensor([0.5]), np.float32(1.5), "0.5", True):
        with pytest.raises(ValueError, match="ratio"):
            select(scores, bad)
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(0), question="q ?")
    for name in available():
        if name in ("learned", "oracle", "evs", "downsample"):  # evs: videos; downsample: no keep (test_peers_*)
            continue
        pruner = get_pruner(name, **({"layer": 1} if name in ("fastv", "dart") else {}))  # a 2-layer LLM
        assert torch.equal(torch.as_tensor(pruner.keep(vlm, p, np.float32(0.25))),
                           torch.as_tensor(pruner.keep(vlm, p, 0.25))), name
        assert torch.equal(torch.as_tensor(pruner.keep(vlm, p, torch.tensor(0.25))),
                           torch.as_tensor(pruner.keep(vlm, p, 0.25))), name


def saved_compressor(tmp_path):
    d = tmp_path / "f"
    Compressor(CompressorConfig(in_channels=2, channels=(4, 8))).save_pretrained(d)
    return d


def test_corrupt_compressor_names_the_folder(no_model, data, tmp_path, capsys):
    d = saved_compressor(tmp_path)
    weights = d / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(InputError, match="model.safetensors: cannot read the weights"):
        Compressor.from_pretrained(d)
    assert main(["eval", "--task", str(data), "--methods", "learned", "--compressor", str(d), "--out",
                 str(tmp_path / "e")]) == 2
    one_error_line(capsys, "eval", f"{weights}: cannot read the weights")
    weights.write_bytes(good)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "channels": [4, 16]}))  # config does not match
    with pytest.raises(InputError, match=f"{d}: the weights do not match its config.json"):
        Compressor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "channels": [4, 8, 8]}))  # one layer more: missing tensors
    with pytest.raises(InputError, match="missing tensors"):
        Compressor.from_pretrained(d)
    (d / "config.json").write_text("{")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        Compressor.from_pretrained(d)


def test_checkpoint_without_weights_or_with_broken_config(tmp_path, tiny_dirs, capsys):
    src = tiny_dirs("qwen2_vl")
    broken = tmp_path / "ckpt"
    shutil.copytree(src, broken)
    for w in broken.glob("*.safetensors"):
        w.unlink()
    with pytest.raises(InputError, match="no weights in"):
        explainprune.load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=f"{broken / 'config.json'}: not valid JSON"):
        explainprune.load(broken)
    (broken / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        explainprune.load(broken)


def test_files_written_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        d = saved_compressor(tmp_path)
        for f in ("model.safetensors", "config.json"):
            assert stat.S_IMODE((d / f).stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="--visual-tokens"):
        main(["--debug", "flops", "--visual-tokens", "0", "--hidden", "4", "--intermediate", "8", "--layers", "2"])
    with pytest.raises(ValueError, match="--visual-tokens"):
        main(["flops", "--visual-tokens", "0", "--hidden", "4", "--intermediate", "8", "--layers", "2", "--debug"])
    assert main(["flops", "--visual-tokens", "0", "--hidden", "4", "--intermediate", "8", "--layers", "2"]) == 2


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    import explainprune.cost as cost

    monkeypatch.setattr(cost, "method_account", lambda *a, **k: 1 / 0)
    assert main(["flops", "--visual-tokens", "4", "--hidden", "4", "--intermediate", "8", "--layers", "2"]) == 1
    one_error_line(capsys, "flops", "ZeroDivisionError", "--debug")


def interrupted(capsys, cmd):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"explainprune {cmd}: interrupted: "), err
    return err[0]


def test_ctrl_c_in_label_says_what_is_kept_and_how_to_resume(monkeypatch, data, tmp_path, capsys):
    import explainprune.labels as labels

    out = tmp_path / "o"

    def killed(vlm, source, out_dir, config, **kwargs):
        (out / "shards").mkdir(parents=True)
        (out / "shards" / "00000.parquet").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(labels, "label", killed)
    monkeypatch.setattr(explainprune, "load", lambda *a, **k: None)
    argv = ["label", "--model", "demo", "--manifest", str(data), "--out", str(out)]
    assert main(argv) == 130
    line = interrupted(capsys, "label")
    assert f"1 finished shard kept in {out}; to resume: explainprune {shlex.join(argv)}" in line


def test_ctrl_c_in_train_resumes_with_resume(monkeypatch, tmp_path, capsys):
    import explainprune.labels as labels
    import explainprune.train as train

    def killed(labels_dir, out, config, resume=False, progress=True):
        (tmp_path / "f" / "checkpoint.json").write_text(json.dumps({"epoch": 3, "dir": "checkpoints/epoch-0003"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(labels, "read_index", lambda d: {})
    monkeypatch.setattr(train, "train", killed)
    argv = ["train", "--labels", str(tmp_path), "--out", str(tmp_path / "f")]
    assert main(argv) == 130
    line = interrupted(capsys, "train")
    assert f"the checkpoint of epoch 3 is kept in {tmp_path / 'f'}; to resume: explainprune " in line
    assert line.endswith(" --resume")


def test_ctrl_c_in_flops_or_show_keeps_nothing(monkeypatch, capsys):
    import explainprune.cost as cost

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cost, "method_account", stop)
    assert main(["flops", "--visual-tokens", "4", "--hidden", "4", "--intermediate", "8", "--layers", "2"]) == 130
    assert interrupted(capsys, "flops").endswith("interrupted: nothing was written")


def test_show_out_without_suffix_writes_the_printed_path(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_image(0).save("a.png")
    assert main(["show", "--model", str(tiny_dirs("qwen2_vl")), "--image", "a.png", "--question", "q ?",
                 "--out", "name", "--max-new-tokens", "2"]) == 0
    assert "wrote name (" in capsys.readouterr().out
    assert (tmp_path / "name").is_file() and not (tmp_path / "name.png").exists()
    with Image.open(tmp_path / "name") as img:
        assert img.format == "PNG"


def test_ctrl_c_in_demo_points_at_the_same_command(monkeypatch, tmp_path, capsys):
    import explainprune.demo as demo

    def stop(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", stop)
    argv = ["demo", "--quick", "--out", str(tmp_path / "d")]
    assert main(argv) == 130
    line = interrupted(capsys, "demo")
    assert f"kept in {tmp_path / 'd'}; to resume: explainprune {shlex.join(argv)}" in line
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "f")]) == 2
    one_error_line(capsys, "demo", "is a file, not a folder")
