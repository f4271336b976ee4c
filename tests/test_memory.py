"""The relevance engine's automatic head_chunk: the pure rule, free memory, and what relevance() runs."""

from __future__ import annotations

import pytest
import torch

import explainprune.attention as attention_module
import explainprune.memory as memory
from explainprune.memory import BYTES_PER_HEAD, FLOOR_BYTES, SAFETY, auto_head_chunk, free_memory
from explainprune.relevance import relevance
from explainprune.testing import random_image


def test_all_heads_when_one_layer_fits():
    n, heads = 1000, 28
    need = heads * BYTES_PER_HEAD * n * n
    assert auto_head_chunk(n, heads, torch.bfloat16, need / SAFETY) is None
    assert auto_head_chunk(n, heads, torch.float32, need / SAFETY * 10) is None


def test_largest_chunk_that_fits():
    n, heads = 1000, 28
    n2 = n * n
    for c in (1, 3, 7, 20):
        free = (FLOOR_BYTES + c * BYTES_PER_HEAD) * n2 / SAFETY + 1
        assert auto_head_chunk(n, heads, torch.bfloat16, free) == c
    just_short = heads * BYTES_PER_HEAD * n2 / SAFETY - 1
    c = auto_head_chunk(n, heads, torch.bfloat16, just_short)  # the chunked path's floor costs ~1 head
    assert c == int((heads * BYTES_PER_HEAD - FLOOR_BYTES) // BYTES_PER_HEAD) < heads
    assert auto_head_chunk(n, heads, torch.bfloat16, 0) == 1  # nothing fits: the leanest there is


def test_issue_example_a_12mp_photo_on_an_80gb_card():
    """15K visual tokens, 28 heads, bf16: the full maps (~100 GB) cannot fit in 60 GB free; chunks can."""
    c = auto_head_chunk(15_000, 28, torch.bfloat16, 60e9)
    assert c is not None and 1 <= c < 28
    assert (FLOOR_BYTES + c * BYTES_PER_HEAD) * 15_000**2 <= SAFETY * 60e9
    assert auto_head_chunk(1_500, 28, torch.bfloat16, 60e9) is None  # the paper's size: all heads at once


def test_wider_dtypes_need_more():
    n, heads, free = 1000, 8, 8 * BYTES_PER_HEAD * 1000**2 / SAFETY
    assert auto_head_chunk(n, heads, torch.float32, free) is None
    assert auto_head_chunk(n, heads, torch.float64, free) is not None
    with pytest.raises(ValueError, match="positive"):
        auto_head_chunk(0, 8, torch.float32, free)


def test_free_memory_of_devices():
    cpu = free_memory("cpu")
    assert isinstance(cpu, int) and cpu > 0
    assert free_memory(torch.device("meta")) is None


@pytest.fixture
def prompt(load_tiny):
    vlm = load_tiny("qwen2_vl")
    return vlm, vlm.prepare(images=random_image(0), question="what digit is in row 2 column 3 ?")


def _free_for_chunk(n: int, c: int) -> float:
    return (FLOOR_BYTES + c * BYTES_PER_HEAD) * n * n / SAFETY + 1


def test_relevance_chunks_when_memory_is_short(prompt, monkeypatch):
    vlm, p = prompt
    answer = [5, 6, 7]
    n = p.length + len(answer) - 1
    monkeypatch.setattr(memory, "free_memory", lambda d: 10**15)
    full = relevance(vlm, p, answer=answer)
    assert full.head_chunk is None
    monkeypatch.setattr(memory, "free_memory", lambda d: _free_for_chunk(n, 2))
    short = relevance(vlm, p, answer=answer)
    assert short.head_chunk == 2
    torch.testing.assert_close(short.token_scores, full.token_scores, rtol=1e-5, atol=1e-7)


def test_explicit_head_chunk_wins(prompt, monkeypatch):
    vlm, p = prompt

    def boom(device):
        raise AssertionError("free memory looked up although head_chunk was given")

    monkeypatch.setattr(memory, "free_memory", boom)
    assert relevance(vlm, p, answer=[5], head_chunk=3).head_chunk == 3


def test_the_tightest_layer_device_decides(prompt, monkeypatch):
    """Sharded model: the smallest free memory over the layers' devices picks the chunk."""
    vlm, p = prompt
    answer = [5, 6]
    n = p.length + len(answer) - 1
    second = torch.device("cpu", 1)
    first_layer = vlm.language_model.layers[0]
    monkeypatch.setattr(attention_module, "module_device", lambda m: torch.device("cpu") if m is first_layer
                        else second)
    monkeypatch.setattr(memory, "free_memory", lambda d: 10**15 if d == torch.device("cpu")
                        else _free_for_chunk(n, 1))
    assert memory.relevance_head_chunk(vlm, n) == 1


def test_unsupported_attention_warns_and_runs_all_heads(prompt, monkeypatch):
    vlm, p = prompt
    monkeypatch.setattr(attention_module, "CHUNKABLE", ())
    monkeypatch.setattr(memory, "free_memory", lambda d: 0)
    with pytest.warns(UserWarning, match="not implemented for this attention class"):
        assert memory.relevance_head_chunk(vlm, 50) is None
