"""benchmarks/real_scale.py's pieces on a tiny model: the synthetic prompt has the layout and M-RoPE
positions ``prepare`` gives a real image of the same token grid; the memory meter sees an allocation;
the shipped configs are the real shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_scale", ROOT / "benchmarks" / "real_scale.py")
    module = sys.modules["real_scale"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                                                            ("llava_onevision_7b", 3584, 28, 28, 4)])
def test_configs_load_as_the_real_shapes(name, hidden, layers, heads, kv):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads((ROOT / "benchmarks" / "configs" / f"{name}.json").read_text()))
    t = config.get_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (hidden, layers,
                                                                                                 heads, kv)
    if config.model_type == "qwen2_vl":
        assert t.rope_parameters["mrope_section"] == [16, 24, 24]
