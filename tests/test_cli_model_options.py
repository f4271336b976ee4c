"""The model-loading options every model-running subcommand shares (cli/common.py): they reach
explainprune.load, bad values are refused by argparse with the accepted ones, `train` takes --device."""

from __future__ import annotations

import argparse

import pytest

import explainprune
import explainprune.models
from explainprune.cli.common import add_model_options, load_options
from explainprune.cli.main import build_parser, main
from explainprune.testing import random_image

MODEL_COMMANDS = ("label", "eval", "show", "demo")


class Stop(ValueError):
    """Raised by the stub load: main() turns it into exit code 2, after the options were recorded."""


@pytest.fixture
def recorded(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda:1 passes the CUDA check
    calls: list[tuple[str, dict]] = []

    def fake_load(name, **kwargs):
        calls.append((str(name), kwargs))
        raise Stop("stopped by the test after load()")

    monkeypatch.setattr(explainprune, "load", fake_load)
    monkeypatch.setattr(explainprune.models, "load", fake_load)
    return calls


def _argv(command: str, tmp_path) -> list[str]:
    """The smallest command line of ``command`` that reaches load()."""
    if command == "label":
        return ["label", "--model", "demo", "--task", "digits", "--limit", "2", "--out", str(tmp_path / "labels")]
    if command == "eval":
        return ["eval", "--model", "demo", "--limit", "2", "--out", str(tmp_path / "eval")]
    if command == "show":
        random_image(0).save(tmp_path / "im.png")
        return ["show", "--model", "demo", "--image", str(tmp_path / "im.png"), "--question", "q",
                "--out", str(tmp_path / "fig.png")]
    return ["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_defaults_reach_load(command, tmp_path, recorded):
    assert main(_argv(command, tmp_path)) == 2
    assert recorded == [("demo", {"dtype": "auto", "attn_implementation": "sdpa"})]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_options_reach_load(command, tmp_path, recorded):
    argv = _argv(command, tmp_path) + ["--device", "cuda:1", "--dtype", "bfloat16", "--attn-implementation",
                                       "eager", "--max-pixels", "3136", "--min-pixels", "784"]
    assert main(argv) == 2
    assert recorded[0][1] == {"device": "cuda:1", "dtype": "bfloat16", "attn_implementation": "eager",
                              "max_pixels": 3136, "min_pixels": 784}
    recorded.clear()
    assert main(_argv(command, tmp_path) + ["--device-map", "auto", "--dtype", "float16"]) == 2
    assert recorded[0][1] == {"device_map": "auto", "dtype": "float16", "attn_implementation": "sdpa"}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize(("option", "value", "accepted"), [
    ("--dtype", "fp8", "'auto', 'float32', 'bfloat16', 'float16'"),
    ("--attn-implementation", "flash", "'sdpa', 'eager', 'flash_attention_2'"),
    ("--device", "gpu", "cpu, cuda, cuda:1, mps"),
    ("--device-map", "everywhere", "auto, balanced, balanced_low_0, sequential"),
    ("--max-pixels", "0", "must be >= 1"),
])
def test_bad_values_are_refused_by_argparse(command, option, value, accepted, tmp_path, recorded, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_argv(command, tmp_path) + [option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and accepted in err
    assert recorded == []


def test_label_under_torchrun_puts_each_rank_on_its_card(tmp_path, recorded, monkeypatch):
    import torch

    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for extra, expected in ((["--device", "cuda"], torch.device("cuda", 1)), ([], torch.device("cuda", 1)),
                            (["--device", "cuda:0"], "cuda:0"), (["--device", "cpu"], "cpu")):
        recorded.clear()
        assert main(_argv("label", tmp_path) + extra) == 2
        assert recorded[0][1]["device"] == expected, extra
    recorded.clear()
    assert main(_argv("label", tmp_path) + ["--device-map", "cuda"]) == 2  # transformers maps it to LOCAL_RANK
    assert "device" not in recorded[0][1] and recorded[0][1]["device_map"] == "cuda"


def test_device_and_device_map_together_is_one_line_error(tmp_path, recorded, capsys):
    assert main(_argv("show", tmp_path) + ["--device", "cuda", "--device-map", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("explainprune show: error:") and "not both" in err and "\n" not in err
    assert recorded == []


def test_one_shared_definition():
    """Every model-running subcommand has the same loading options (one helper, not copies)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    reference = argparse.ArgumentParser()
    add_model_options(reference)
    wanted = {a.dest: (a.default, a.choices) for a in reference._actions if a.dest != "help"}
    for command in MODEL_COMMANDS:
        have = {a.dest: (a.default, a.choices) for a in sub.choices[command]._actions}
        assert {k: have.get(k) for k in wanted} == wanted, command
    assert load_options(reference.parse_args([])) == {"dtype": "auto", "attn_implementation": "sdpa"}


def test_train_takes_device(tmp_path, monkeypatch):
    import torch

    import explainprune.labels as labels
    import explainprune.train as train_module

    seen = {}
    monkeypatch.setattr(labels, "read_index", lambda d: {})  # checked before training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda:0 passes the CUDA check

    def fake_train(labels, out, config, resume=False, progress=True, device="cpu"):
        seen["device"] = device
        raise Stop("stopped by the test")

    monkeypatch.setattr(train_module, "train", fake_train)
    base = ["train", "--labels", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main(base + ["--device", "cuda:0"]) == 2
    assert seen["device"] == "cuda:0"
    assert main(base) == 2
    assert seen["device"] == "cpu"
    with pytest.raises(SystemExit):
        main(base + ["--device", "gpu"])
