"""The device cases that need CUDA: tiny random models on the GPU, in float32 (compared with CPU) and in
bfloat16 (runs, sane numbers). Marked ``gpu``: ``make test-gpu`` runs them; ``make test`` leaves them out,
and without CUDA they skip. ``EXPLAINPRUNE_TEST_DEVICE=cpu`` runs the same code on CPU (a dry run of the
tests themselves). The CPU versions with a fake second device are tests/test_devices.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import explainprune
from explainprune.compressor import Compressor
from explainprune.labels import LabelConfig, label
from explainprune.memory import free_memory
from explainprune.pruning.fastv import FastV
from explainprune.relevance import relevance
from explainprune.testing import random_image
from explainprune.train import TrainConfig, train
from test_labels import FakeVLM  # tests/ is on sys.path (its conftest.py)
from test_train import SMALL, ToyLabeler, ToySource

DEVICE = torch.device(os.environ.get("EXPLAINPRUNE_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
QUESTION = "what digit is in row 2 column 3 ?"
ANSWER = [5, 6, 7]


def load(path, device=DEVICE, dtype=torch.float32, impl="sdpa"):
    return explainprune.load(path, dtype=dtype, device=device, attn_implementation=impl)


def prompts(vlm):
    return [vlm.prepare(images=random_image(0), question=QUESTION),
            vlm.prepare(images=random_image(1, (56, 84)), question="how many 7 are there ?")]


def overlap(a, b) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / max(1, len(a))


@pytest.mark.parametrize("family,impl", [("qwen2_vl", "eager"), ("qwen2_vl", "sdpa"), ("llava", "sdpa"),
                                         ("llava_onevision", "eager")])
def test_fastv_fp32_matches_cpu_and_bf16_runs(deep_dirs, family, impl):
    cpu, dev = load(deep_dirs(family), "cpu", impl=impl), load(deep_dirs(family), impl=impl)
    ps_cpu, ps_dev = prompts(cpu), prompts(dev)
    for vlm, ps in ((cpu, ps_cpu), (dev, ps_dev)):
        assert FastV(layer=2).generate(vlm, ps[0], 0.25, max_new_tokens=3).keep.device.type == "cpu"
    torch.testing.assert_close(FastV(layer=2).score(dev, ps_dev[0]), FastV(layer=2).score(cpu, ps_cpu[0]),
                               atol=1e-5, rtol=1e-3)
    ref = FastV(layer=2).generate(cpu, ps_cpu, 0.25, max_new_tokens=3, output_logits=True)
    got = FastV(layer=2).generate(dev, ps_dev, 0.25, max_new_tokens=3, output_logits=True)  # padded batch
    for g, r in zip(got, ref):
        assert overlap(g.keep, r.keep) >= 0.9
        if g.keep.tolist() == r.keep.tolist():
            torch.testing.assert_close(g.logits[:1], r.logits[:1], atol=1e-3, rtol=1e-3)
    bf = load(deep_dirs(family), dtype=torch.bfloat16, impl=impl)
    ps = prompts(bf)
    batch = FastV(layer=2).generate(bf, ps, 0.25, max_new_tokens=3, output_logits=True)
    for p, b in zip(ps, batch):
        assert b.visual_tokens == len(b.keep) == -(-p.num_visual // 4) and torch.isfinite(b.logits).all()
    full = FastV(layer=2).generate(bf, ps[0], 1.0, max_new_tokens=3)
    assert full.token_ids == bf.generate(ps[0], max_new_tokens=3).token_ids


@pytest.mark.skipif(DEVICE.type != "cuda", reason="flash attention needs CUDA")
def test_fastv_with_flash_attention_2(deep_dirs):
    pytest.importorskip("flash_attn")
    fa = load(deep_dirs("qwen2_vl"), dtype=torch.bfloat16, impl="flash_attention_2")
    sd = load(deep_dirs("qwen2_vl"), dtype=torch.bfloat16, impl="sdpa")
    got = FastV(layer=2).generate(fa, prompts(fa), 0.25, max_new_tokens=3, output_logits=True)
    ref = FastV(layer=2).generate(sd, prompts(sd), 0.25, max_new_tokens=3, output_logits=True)
    for g, r in zip(got, ref):
        assert overlap(g.keep, r.keep) >= 0.8
        if g.keep.tolist() == r.keep.tolist():
            torch.testing.assert_close(g.logits[0].float(), r.logits[0].float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_relevance_on_device(deep_dirs, family):
    cpu, dev = load(deep_dirs(family), "cpu"), load(deep_dirs(family))
    p_cpu, p_dev = prompts(cpu)[0], prompts(dev)[0]
    for options in (dict(), dict(rule="mean"), dict(head_chunk=1), dict(clamp=False, batch_bytes=1 << 30)):
        got = relevance(dev, p_dev, answer=ANSWER, **options).scores
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, relevance(cpu, p_cpu, answer=ANSWER, **options).scores,
                                   atol=1e-6, rtol=1e-3)
    assert free_memory(DEVICE) > 0
    assert relevance(dev, p_dev, answer=ANSWER).head_chunk is None  # tiny: all heads fit at once
    bf = load(deep_dirs(family), dtype=torch.bfloat16)
    r16 = relevance(bf, prompts(bf)[0], answer=ANSWER).scores
    r32 = relevance(dev, p_dev, answer=ANSWER).scores
    assert torch.isfinite(r16).all()
    assert torch.corrcoef(torch.stack([r16.float(), r32]))[0, 1] > 0.9


def test_auto_head_chunk_on_device(deep_dirs, monkeypatch):
    """Short of memory (patched), relevance chunks the heads on the GPU and gives the same numbers."""
    import explainprune.memory as memory

    vlm = load(deep_dirs("qwen2_5_vl"), dtype=torch.bfloat16)
    p = prompts(vlm)[0]
    full = relevance(vlm, p, answer=ANSWER)
    n = p.length + len(ANSWER) - 1
    monkeypatch.setattr(memory, "free_memory", lambda d: (memory.FLOOR_BYTES + memory.BYTES_PER_HEAD) * n * n)
    short = relevance(vlm, p, answer=ANSWER)
    assert full.head_chunk is None and short.head_chunk == 1
    torch.testing.assert_close(short.scores, full.scores, atol=1e-4, rtol=2e-2)


def test_learned_pruner_and_generation_on_device(deep_dirs):
    cpu, dev = load(deep_dirs("qwen2_vl"), "cpu"), load(deep_dirs("qwen2_vl"))
    comp = Compressor(in_channels=cpu.text_config.num_attention_heads)
    a = explainprune.get_pruner("learned", compressor=comp)
    ref = a.score(cpu, prompts(cpu)[0])
    got = a.score(dev, prompts(dev)[0])
    assert next(comp.parameters()).device.type == DEVICE.type  # f_θ moved to the model's device
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    assert cpu.generate(prompts(cpu)[0], max_new_tokens=4).token_ids == \
        dev.generate(prompts(dev)[0], max_new_tokens=4).token_ids
    bf = load(deep_dirs("qwen2_vl"), dtype=torch.bfloat16)
    out = a.generate(bf, prompts(bf)[0], 0.25, max_new_tokens=4)
    assert out.visual_tokens == -(-prompts(bf)[0].num_visual // 4) and len(out.token_ids) >= 1


def test_accelerate_offload_and_multi_gpu_shards(deep_dirs):
    """device_map through accelerate: layers 1-2 CPU-offloaded (weights on meta, executed on the GPU),
    and, with two GPUs, layers split over cuda:0 / cuda:1. Relevance and FastV equal one device."""
    accelerate = pytest.importorskip("accelerate")
    if DEVICE.type != "cuda":
        pytest.skip("accelerate offload runs on CUDA")
    ref = load(deep_dirs("qwen2_vl"))
    p_ref = prompts(ref)
    rel_ref = relevance(ref, p_ref[0], answer=ANSWER).scores
    fv_ref = FastV(layer=2).generate(ref, p_ref, 0.25, max_new_tokens=3)
    maps = [lambda i: "cpu" if 1 <= i < 3 else 0]
    if torch.cuda.device_count() > 1:
        maps.append(lambda i: 1 if i >= 2 else 0)
    for where in maps:
        vlm = load(deep_dirs("qwen2_vl"), "cpu")
        names = {"model.visual": 0, "model.language_model.embed_tokens": 0, "model.language_model.rotary_emb": 0,
                 "model.language_model.norm": 0, "lm_head": 0}
        names.update({f"model.language_model.layers.{i}": where(i) for i in range(4)})
        accelerate.dispatch_model(vlm.model, device_map=names)
        p = prompts(vlm)
        torch.testing.assert_close(relevance(vlm, p[0], answer=ANSWER).scores, rel_ref, atol=1e-6, rtol=1e-3)
        for g, r in zip(FastV(layer=2).generate(vlm, p, 0.25, max_new_tokens=3), fv_ref):
            assert overlap(g.keep, r.keep) >= 0.9


def test_train_on_device(tmp_path):
    label(FakeVLM(), ToySource(24), tmp_path / "l", LabelConfig(shard_size=8), labeler=ToyLabeler(), progress=False)
    config = TrainConfig(epochs=2, **SMALL)
    ref = train(tmp_path / "l", tmp_path / "cpu", config, progress=False)
    got = train(tmp_path / "l", tmp_path / "dev", config, progress=False, device=DEVICE)
    for k in ref.metrics:
        assert abs(got.metrics[k] - ref.metrics[k]) < 1e-3, k
