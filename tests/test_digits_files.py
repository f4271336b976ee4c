"""The demo model's training scripts load their own intermediate files without unpickling code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("explainprune.tasks.digits_llm")
from explainprune.tasks import digits_llm as dl  # noqa: E402
from explainprune.tasks import digits_train as dt  # noqa: E402
from explainprune.tasks.digits_data import Boards  # noqa: E402


def test_banks_round_trip_with_weights_only(tmp_path):
    rng = np.random.default_rng(0)
    boards = Boards(glyph=rng.integers(-1, 9, (2, 3, 3)), digit=rng.integers(-1, 9, (2, 3, 3)),
                    frame=np.array([0, 1]), marks=rng.integers(-1, 9, (2, 3)))
    banks = [dl.Bank(torch.randn(2, 4, 8).half(), boards)]
    torch.save(dl.banks_state(banks), tmp_path / "banks.pt")
    back = dl.banks_from_state(torch.load(tmp_path / "banks.pt", weights_only=True))
    assert torch.equal(back[0].feats, banks[0].feats)
    for k in dl.BOARD_FIELDS:
        assert np.array_equal(getattr(back[0].boards, k), getattr(boards, k))


def test_stage_checkpoints_load_with_weights_only(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    dt._save(tmp_path / "stage.pt", 7, {"net": net, "opt": opt})
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters())
    assert dt._load(tmp_path / "stage.pt", {"net": net2, "opt": opt2}) == 7
    assert torch.equal(net2.weight, net.weight)
    torch.save({"step": 1, "evil": object()}, tmp_path / "pickled.pt")  # a file that needs unpickling code
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        dt._load(tmp_path / "pickled.pt", {})
