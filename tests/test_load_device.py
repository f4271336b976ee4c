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


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_onevision", "qwen3_vl"])
def test_eager_is_for_the_language_model_only(tiny_dirs, family):
    """--attn-implementation eager: the text decoder runs eager (its attention maps are what relevance and
    FastV read); the vision tower stays on sdpa (eager there builds [heads, S, S] maps over the patches)."""
    vlm = explainprune.load(tiny_dirs(family), attn_implementation="eager")
    assert vlm.model.config.get_text_config()._attn_implementation == "eager"
    assert vlm.model.config.vision_config._attn_implementation == "sdpa"
    p = vlm.prepare(images=__import__("explainprune.testing").testing.random_image(0), question="what is here ?")
    assert len(vlm.generate(p, max_new_tokens=2).token_ids) >= 1
