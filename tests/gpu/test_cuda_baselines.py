"""The baselines on the GPU: in float32 each keeps (almost) what it keeps on CPU and generates the same first
token; in bfloat16 it runs; seeded ``random`` keeps exactly the same tokens on CPU and GPU, fp32 and bf16.
Marked ``gpu`` like tests/gpu/test_cuda.py (``EXPLAINPRUNE_TEST_DEVICE=cpu`` dry-runs them on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

import explainprune
from explainprune import get_pruner
from explainprune.testing import random_image

DEVICE = torch.device(os.environ.get("EXPLAINPRUNE_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
QUESTION = "what digit is in row 2 column 3 ?"
METHODS = ("layer0", "pdrop", "dart", "divprune", "visionzip", "uniform")


@pytest.fixture(scope="module")
def path(deep_dirs):
    return deep_dirs("qwen2_vl")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_baselines_on_the_device(path, impl):
    cpu = explainprune.load(path, device="cpu", attn_implementation=impl)
    dev = explainprune.load(path, device=DEVICE, attn_implementation=impl)
    bf = explainprune.load(path, device=DEVICE, dtype=torch.bfloat16, attn_implementation=impl)
    p_cpu, p_dev = (v.prepare(images=random_image(0), question=QUESTION) for v in (cpu, dev))
    frames = [random_image(10 + i, (112, 112)) for i in range(4)]
    for name in METHODS:
        ref = get_pruner(name).generate(cpu, p_cpu, 0.25, max_new_tokens=2, output_logits=True)
        got = get_pruner(name).generate(dev, p_dev, 0.25, max_new_tokens=2, output_logits=True)
        assert got.visual_tokens == ref.visual_tokens, name
        if getattr(got, "keep", None) is not None:
            same = len(set(got.keep.tolist()) & set(ref.keep.tolist())) / len(ref.keep)
            assert same >= 0.9, name
        if got.token_ids[:1] == ref.token_ids[:1]:
            torch.testing.assert_close(got.logits[:1], ref.logits[:1], atol=1e-3, rtol=1e-3)
        batch = [bf.prepare(images=random_image(1, (56, 84)), question=QUESTION),
                 bf.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?")]
        for out in get_pruner(name).generate(bf, batch, 0.25, max_new_tokens=2, output_logits=True):
            assert torch.isfinite(out.logits).all(), name


def test_random_same_on_every_device_and_dtype(path):
    keeps = []
    for device, dtype in (("cpu", torch.float32), (DEVICE, torch.float32), (DEVICE, torch.bfloat16)):
        vlm = explainprune.load(path, device=device, dtype=dtype)
        keeps.append(get_pruner("random", seed=2).keep(vlm, vlm.prepare(images=random_image(3), question=QUESTION),
                                                        0.25).tolist())
    assert keeps[0] == keeps[1] == keeps[2]
