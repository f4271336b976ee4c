"""torchrun labelling on GPUs: each rank on cuda:LOCAL_RANK with NCCL, gloo on CPU, hours-long barrier timeouts.

No GPU or second process here: torch.distributed and the CUDA calls are replaced by recorders (the real
two-rank gloo run is test_labels.py::test_torchrun_two_ranks_equal_single_process).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from explainprune.labels import DIST_TIMEOUT, LabelConfig, label, rank_device
from test_labels import FakeVLM, SyntheticSource, synthetic_labeler


@pytest.fixture
def torchrun(monkeypatch):
    """Rank 1 of 2 (LOCAL_RANK 1) with a recording torch.distributed; returns the record."""
    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("EXPLAINPRUNE_DIST_TIMEOUT_HOURS", raising=False)
    rec: dict = {"barriers": [], "state": {"init": False}}
    dist = torch.distributed

    def init(backend, **kwargs):
        rec.update(backend=backend, **kwargs)
        rec["state"]["init"] = True

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "is_initialized", lambda: rec["state"]["init"])
    monkeypatch.setattr(dist, "get_backend", lambda *a: rec["backend"])
    monkeypatch.setattr(dist, "barrier", lambda **kw: rec["barriers"].append(kw))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: rec["state"].update(init=False))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: rec.update(set_device=d))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: rec.get("set_device", 0))
    return rec


class CudaVLM(FakeVLM):
    def __init__(self, device):
        self.device = torch.device(device)


def test_rank_device(torchrun, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device(None) == torch.device("cuda", 1)
    assert rank_device("cuda") == torch.device("cuda", 1)
    assert rank_device("cuda:0") == "cuda:0" and rank_device("cpu") == "cpu"  # explicit choices stay
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("cuda") == "cuda"  # one process: nothing to spread


def test_gpu_ranks_use_nccl_on_their_own_card(torchrun, tmp_path):
    rep = label(CudaVLM("cuda:1"), SyntheticSource(8), tmp_path, LabelConfig(shard_size=2),
                labeler=synthetic_labeler(), progress=False)
    assert rep.rank == 1 and rep.shards_written == 2
    assert torchrun["backend"] == "nccl" and torchrun["device_id"] == torch.device("cuda", 1)
    assert torchrun["set_device"] == 1 and torchrun["timeout"] == DIST_TIMEOUT >= timedelta(hours=6)
    assert torchrun["barriers"] == [{"device_ids": [1]}] * 2
    assert not torchrun["state"]["init"]  # the group it created is destroyed


def test_cpu_ranks_use_gloo_with_a_long_timeout(torchrun, tmp_path, monkeypatch):
    label(FakeVLM(), SyntheticSource(4), tmp_path / "a", LabelConfig(shard_size=2), labeler=synthetic_labeler(),
          progress=False)
    assert torchrun["backend"] == "gloo" and torchrun["timeout"] == DIST_TIMEOUT
    assert torchrun["barriers"] == [{}, {}]
    monkeypatch.setenv("EXPLAINPRUNE_DIST_TIMEOUT_HOURS", "30")
    label(FakeVLM(), SyntheticSource(4), tmp_path / "b", LabelConfig(shard_size=2), labeler=synthetic_labeler(),
          progress=False)
    assert torchrun["timeout"] == timedelta(hours=30)
    label(FakeVLM(), SyntheticSource(4), tmp_path / "c", LabelConfig(shard_size=2), labeler=synthetic_labeler(),
          progress=False, dist_timeout=timedelta(minutes=5))
    assert torchrun["timeout"] == timedelta(minutes=5)
    monkeypatch.setenv("EXPLAINPRUNE_DIST_TIMEOUT_HOURS", "soon")
    with pytest.raises(ValueError, match="positive number of hours"):
        label(FakeVLM(), SyntheticSource(4), tmp_path / "d", LabelConfig(shard_size=2),
              labeler=synthetic_labeler(), progress=False)


def test_model_on_another_rank_card_warns(torchrun, tmp_path):
    with pytest.warns(UserWarning, match="cuda:LOCAL_RANK"):
        label(CudaVLM("cuda:0"), SyntheticSource(4), tmp_path, LabelConfig(shard_size=2),
              labeler=synthetic_labeler(), progress=False)
    assert torchrun["set_device"] == 1
