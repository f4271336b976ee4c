"""benchmarks/real_scale.py's pieces on a tiny model: the synthetic prompt has the layout and M-RoPE
positions ``prepare`` gives a real image of the same token grid; the memory meter sees an allocation;
the shipped configs are the real shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from explainprune.testing import script_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return script_module(ROOT / "benchmarks" / "real_scale.py", "real_scale")


def test_synthetic_prompt_matches_a_prepared_image(bench, load_tiny):
    from explainprune.testing import random_image

    vlm = load_tiny("qwen2_vl")
    rows, cols = bench.grid(24)
    assert (rows, cols) == (5, 5)
    real = vlm.prepare(images=random_image(0, (2 * rows * 14, 2 * cols * 14)), question="what is here ?")
    fake = bench.synthetic_prompt(vlm, 24)
    assert fake.num_visual == real.num_visual == rows * cols
    assert torch.equal(fake.visual_grid, real.visual_grid)
    rel = fake.position_ids[:, 0, fake.visual_pos] - fake.position_ids[:, 0, fake.visual_pos[:1]]
    ref = real.position_ids[:, 0, real.visual_pos] - real.position_ids[:, 0, real.visual_pos[:1]]
    assert torch.equal(rel, ref)  # the same 3-D (t, h, w) layout of the visual block
    after = fake.position_ids[:, 0, int(fake.visual_pos[-1]) + 1]
    assert (after == fake.position_ids[:, 0, fake.visual_pos].max() + 1).all()  # text resumes after it
    start, end = fake.instruction
    assert end - start == 16 and start > int(fake.visual_pos[-1])
    assert fake.inputs_embeds.shape == (1, fake.length, vlm.text_config.hidden_size)


def test_memory_meter_sees_an_allocation(bench):
    seconds, peak, out = bench.measured(lambda: torch.ones(64 * 2**20, dtype=torch.uint8).add_(1).sum(),
                                        torch.device("cpu"))
    assert seconds > 0 and int(out) == 2 * 64 * 2**20 and peak > 48 * 2**20


@pytest.mark.parametrize("name, hidden, layers, heads, kv", [("qwen2_vl_2b", 1536, 28, 12, 2),
                                                            ("qwen2_vl_7b", 3584, 28, 28, 4),
                                                            ("llava_onevision_7b", 3584, 28, 28, 4),
                                                            ("qwen3_vl_8b", 4096, 36, 32, 8)])
def test_configs_load_as_the_real_shapes(name, hidden, layers, heads, kv):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads((ROOT / "benchmarks" / "configs" / f"{name}.json").read_text()))
    t = config.get_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (hidden, layers,
                                                                                                 heads, kv)
    if config.model_type == "qwen2_vl":
        assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    if config.model_type == "qwen3_vl":
        assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["mrope_interleaved"]
        assert t.head_dim == 128 and config.vision_config.deepstack_visual_indexes == [8, 16, 24]
        assert (config.vision_config.patch_size, config.vision_config.out_hidden_size) == (16, 4096)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "qwen3_vl"])
def test_every_measurement_runs_on_a_tiny_model(bench, load_tiny, family):
    """measure_tokens end to end (prefill, learned, FastV, relevance, label) on a tiny model of each shape's
    family, so the script's code paths stay runnable."""
    import argparse

    from explainprune import get_pruner
    from explainprune.compressor import Compressor

    vlm = load_tiny(family)
    if family == "qwen3_vl":  # DeepStack rows in the synthetic prompt, one per level
        fake = bench.synthetic_prompt(vlm, 20)
        assert sorted(fake.visual_residuals) == [0, 1] and fake.visual_residuals[0].shape == (20, 64)
    learned = get_pruner("learned", compressor=Compressor(in_channels=vlm.text_config.num_attention_heads))
    args = argparse.Namespace(repeats=2, relevance_repeats=1, head_chunk=None, label_samples=2, answer_tokens=2)
    row = bench.measure_tokens(vlm, 20, args, learned, 1, [3, 4])
    assert row["visual_tokens"] == 20 and [p["method"] for p in row["prefill"]][:3] == ["vanilla", "learned",
                                                                                          "fastv (K=1)"]
    assert [p["kept"] for p in row["prefill"]] == [20, 10, 10, 5, 5, 2, 2]
    assert all(p["s"] > 0 for p in row["prefill"]) and row["learned_scoring"]["share_of_prefill"] > 0
    assert row["relevance"]["finite"] and row["label"]["samples"] == 2 and row["label"]["samples_per_min"] > 0
    assert "vanilla" in bench.table({"setting": {"shape": "x", "config": "c", "layers": 2, "hidden": 64, "heads": 4,
                                                 "kv_heads": 2, "intermediate": 128, "dtype": "float32",
                                                 "device": "cpu", "attn": "sdpa", "weights_bytes": 1, "repeats": 2},
                                     "environment": {"device": "cpu", "threads": 1}, "results": [row]})


def test_timed_rounds_follow_an_untimed_warmup(bench):
    calls = {"a": 0, "b": 0}

    def job(name):
        def fn():
            calls[name] += 1
            return calls[name]
        return fn

    out = bench.interleaved({"a": job("a"), "b": job("b")}, torch.device("cpu"), 3, warmup=2)
    assert calls == {"a": 5, "b": 5}  # 2 warm-up rounds + 3 timed
    assert out["a"][2] == 5 and out["b"][2] == 5


def test_cuda_timing_keeps_the_allocator_cache(bench, monkeypatch):
    """The timed path on CUDA never empties the cache (that made every pruned prefill pay fresh
    allocations) and reads the peak above the allocation at the start. Runs on CPU with torch.cuda's
    memory calls replaced for this test only."""
    allocated = iter([1000])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (_ for _ in ()).throw(AssertionError("emptied")))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5000)

    class FixedClock:
        def __call__(self, fn):
            return 0.25, fn()

    seconds, peak, out = bench.measured(lambda: 7, torch.device("cuda"), FixedClock())
    assert (seconds, peak, out) == (0.25, 4000, 7)
