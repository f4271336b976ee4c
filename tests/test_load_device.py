"""load(device=...) reads the checkpoint straight onto the device (one-device device_map, no accelerate hooks)
instead of loading the whole model on the CPU and moving it (a 16 GB host copy for a 7B)."""

from __future__ import annotations

import pytest
import torch

import explainprune
from explainprune.models.qwen2_vl import Qwen2VL


@pytest.fixture
def seen(monkeypatch):
    calls = []
    original = Qwen2VL._load.__func__

    def spy(cls, path, **options):
        calls.append(options)
        return original(cls, path, **options)

    monkeypatch.setattr(Qwen2VL, "_load", classmethod(spy))
    return calls


def test_device_load_goes_straight_to_the_device(tiny_dirs, seen):
    vlm = explainprune.load(tiny_dirs("qwen2_vl"), device="meta")  # any non-CPU device: meta holds no data
    assert seen[-1]["device_map"] == {"": torch.device("meta")}
    assert {p.device.type for p in vlm.model.parameters()} == {"meta"}
    assert not hasattr(vlm.model, "_hf_hook")  # no accelerate dispatch for one device


def test_cpu_load_passes_no_device_map(tiny_dirs, seen):
    vlm = explainprune.load(tiny_dirs("qwen2_vl"))
    assert "device_map" not in seen[-1]
    assert {p.device.type for p in vlm.model.parameters()} == {"cpu"}
