"""A training run folder is accepted wherever a compressor folder is (``compressor_path.compressor_dir``):
``get_pruner("learned")`` (hence eval, flops and lmms-eval)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from explainprune.compressor import Compressor
from explainprune.compressor_path import compressor_dir, is_compressor_dir, weights_sha256
from explainprune.pruning import get_pruner


@pytest.fixture
def run(tmp_path):
    """A training run folder as `explainprune train --out RUN` leaves it: RUN/compressor holds f_θ."""
    torch.manual_seed(0)
    Compressor(in_channels=4, channels=(8, 16)).save_pretrained(tmp_path / "run" / "compressor")
    (tmp_path / "run" / "log.jsonl").write_text("")
    return tmp_path / "run"


def test_compressor_dir(run, tmp_path):
    inner = run / "compressor"
    assert compressor_dir(str(run)) == str(inner) and compressor_dir(run) == inner
    assert compressor_dir(str(inner)) == str(inner)  # already loadable: unchanged
    for other in ("org/name", str(tmp_path / "missing"), str(tmp_path)):
        assert compressor_dir(other) == other  # a hub id, a missing path, a folder without one: the loader judges
    c = Compressor(in_channels=4)
    assert compressor_dir(c) is c
    assert is_compressor_dir(inner) and not is_compressor_dir(run)
    assert weights_sha256(inner) == hashlib.sha256((inner / "model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(run) is None


def test_learned_pruner_takes_a_run_folder(run):
    pruner = get_pruner("learned", compressor=str(run))
    expected = Compressor.from_pretrained(run / "compressor")
    for a, b in zip(pruner.compressor.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)


def test_demo_names_the_shipped_compressor(tmp_path, monkeypatch):
    from explainprune.compressor_path import DEMO_COMPRESSOR

    monkeypatch.chdir(tmp_path)
    assert compressor_dir("demo") == str(DEMO_COMPRESSOR) and is_compressor_dir(DEMO_COMPRESSOR)
    shipped = Compressor.from_pretrained("demo")
    assert shipped.config.skip and shipped.config.fingerprint["model_type"] == "qwen2_vl"
    import explainprune

    shipped.check_compatible(explainprune.load("demo"))  # trained for the shipped demo model
    saved = json.loads((DEMO_COMPRESSOR / "config.json").read_text())
    assert saved["weights_sha256"] == weights_sha256(DEMO_COMPRESSOR)  # checked on load; shipped with its checksum
    assert "explainprune train" in (DEMO_COMPRESSOR / "README.md").read_text()  # the card names the recipe
    # a local folder named demo wins, as for any other name
    torch.manual_seed(1)
    Compressor(in_channels=4, channels=(8, 16)).save_pretrained(tmp_path / "demo")
    assert compressor_dir("demo") == "demo"
    assert Compressor.from_pretrained("demo").config.channels == (8, 16)
