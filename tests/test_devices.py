"""Device placement, checked on CPU with a second (fake) device that refuses mixed-device ops as CUDA does.

A model moved wholly to the fake device, or sharded layer by layer over CPU and the fake device the way
accelerate's ``device_map`` hooks do it, must give the CPU numbers; every tensor the library makes for
the model is made on the right device (``tests/fakedevice.py``). The CUDA versions are in tests/gpu/.
"""

from __future__ import annotations

import pytest
import torch

import explainprune
from explainprune.attention import _text_attention, first_layer_attention, module_device
from explainprune.compressor import Compressor
from explainprune.pruning.base import Pruner, as_keep, select
from explainprune.pruning.fastv import FastV
from explainprune.relevance import relevance
from explainprune.testing import random_image
from fakedevice import CPU, FAKE, FakeDevices, shard, to_device

QUESTION = "what digit is in row 2 column 3 ?"


def test_the_fake_device_refuses_what_cuda_refuses():
    """The harness itself: mixing devices raises, CPU scalars / CPU indices / copies are allowed, and
    autograd runs through it."""
    with FakeDevices():
        x = torch.ones(3, device=FAKE, requires_grad=True)
        assert x.device == FAKE and (x * 2).device == FAKE
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(3).masked_fill(torch.ones(3, dtype=torch.bool, device=FAKE), 1.0)
        assert (x * torch.tensor(2.0)).device == FAKE                 # a CPU scalar is fine
        assert x[torch.tensor([0, 2])].device == FAKE                 # CPU indices are fine
        assert x.detach().cpu().device == CPU and x.sum().item() == 3.0
        (x * x).sum().backward()
        assert x.grad.device == FAKE and x.grad.tolist() == [2.0, 2.0, 2.0]


def prompts(vlm):
    return [vlm.prepare(images=random_image(0), question=QUESTION),
            vlm.prepare(images=random_image(1, (56, 84)), question="how many 7 are there ?")]


def sharded(vlm, lm_head_on_fake: bool) -> None:
    """Layers 1-2 on the fake device, 0 and 3 on CPU; the final norm (and LM head) on either."""
    lm = vlm.language_model
    plan = {layer: FAKE if 1 <= i < 3 else CPU for i, layer in enumerate(lm.layers)}
    plan[lm.norm] = FAKE if lm_head_on_fake else CPU
    if lm_head_on_fake:
        plan[vlm.model.get_output_embeddings()] = FAKE
    shard(vlm.model, plan)


def fastv_runs(vlm, ps):
    one = FastV(layer=2).generate(vlm, ps[0], 0.25, max_new_tokens=3, output_logits=True)
    batch = FastV(layer=2).generate(vlm, ps, 0.25, max_new_tokens=3, output_logits=True)
    return [one, *batch]


def assert_same_runs(got, ref):
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids and g.keep.tolist() == r.keep.tolist()
        assert g.keep.device == CPU
        torch.testing.assert_close(g.logits, r.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,impl", [("qwen2_vl", "eager"), ("llava", "sdpa"), ("llava_onevision", "sdpa"),
                                         ("qwen3_vl", "eager")])
def test_fastv_on_another_device(deep_dirs, family, impl):
    """FastV's masks and indices follow the model (they were built on CPU: eager, or sdpa with a padded
    batch, crashed on CUDA)."""
    vlm = explainprune.load(deep_dirs(family), attn_implementation=impl)
    ps = prompts(vlm)
    ref, ref_score = fastv_runs(vlm, ps), FastV(layer=2).score(vlm, ps[0])
    with FakeDevices():
        to_device(vlm.model, FAKE)
        assert vlm.device == FAKE
        assert_same_runs(fastv_runs(vlm, ps), ref)
        torch.testing.assert_close(FastV(layer=2).score(vlm, ps[0]), ref_score)
        on_device = prompts(vlm)  # prepared by the model on the device: embeddings live there
        assert on_device[0].inputs_embeds.device == FAKE
        assert_same_runs(fastv_runs(vlm, on_device), ref)


FLASH = "explainprune_test_flash"


def _flash_like(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FA2's contract on CPU: the mask is None or 2-D bool [B, kv] (causal is implied, bottom-right)."""
    assert attention_mask is None or (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool), \
        f"flash attention got a {attention_mask.dim()}-D {attention_mask.dtype} mask"
    q, kv = query.shape[-2], key.shape[-2]
    allowed = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_fastv_gives_flash_attention_a_2d_mask(deep_dirs, family):
    """Under a flash implementation layers >= K get FA2's 2-D bool mask (a 4-D additive one is what
    eager / sdpa take), also for a left-padded batch; the outputs equal sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FLASH, _flash_like)
    AttentionMaskInterface.register(FLASH, flash_attention_mask)
    vlm = explainprune.load(deep_dirs(family))
    ps = prompts(vlm)
    ref = fastv_runs(vlm, ps)
    seen = []
    hook = vlm.language_model.layers[3].self_attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
    try:
        with _text_attention(vlm, FLASH):
            got = fastv_runs(vlm, ps)
    finally:
        hook.remove()
    assert_same_runs(got, ref)
    assert all(m is not None and m.dim() == 2 and m.dtype == torch.bool for m in seen)
    kept = ps[0].length - ps[0].num_visual + len(ref[0].keep)
    assert seen[0].shape == (1, kept) and bool(seen[0].all())  # prefill of the single prompt


@pytest.mark.parametrize("family,lm_head_on_fake", [("qwen2_vl", False), ("qwen2_vl", True), ("qwen3_vl", True)])
def test_sharded_model(deep_dirs, family, lm_head_on_fake):
    """Layers over two devices (device_map): relevance folds each layer on its device, FastV, A_v^0, the
    learned pruner and generation give the single-device numbers (Qwen3-VL: DeepStack rows included)."""
    vlm = explainprune.load(deep_dirs(family))
    p = prompts(vlm)[0]
    comp = Compressor(in_channels=vlm.text_config.num_attention_heads)
    learned = explainprune.get_pruner("learned", compressor=comp)
    options = [dict(rule="grad"), dict(rule="mean"), dict(rule="grad", head_chunk=2), dict(rule="mean", head_chunk=3),
               dict(rule="grad", clamp=False, batch_bytes=1 << 30)]
    ref_rel = [relevance(vlm, p, answer=[5, 6, 7], **o).scores for o in options]
    ref_att = first_layer_attention(vlm, p)
    ref_learned = learned.generate(vlm, p, 0.5, max_new_tokens=3)
    ref_fastv = fastv_runs(vlm, prompts(vlm))
    with FakeDevices():
        sharded(vlm, lm_head_on_fake)
        for o, ref in zip(options, ref_rel):
            torch.testing.assert_close(relevance(vlm, p, answer=[5, 6, 7], **o).scores, ref, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(first_layer_attention(vlm, p), ref_att)
        assert learned.generate(vlm, p, 0.5, max_new_tokens=3).token_ids == ref_learned.token_ids
        assert_same_runs(fastv_runs(vlm, prompts(vlm)), ref_fastv)


def test_learned_pruner_runs_f_theta_on_the_model_device(deep_dirs):
    """A_v^0 and f_θ run where the model is (f_θ used to run on CPU whatever the model's device)."""
    vlm = explainprune.load(deep_dirs("llava"))
    p = prompts(vlm)[0]
    comp = Compressor(in_channels=vlm.text_config.num_attention_heads)
    pruner = explainprune.get_pruner("learned", compressor=comp)
    ref_scores, ref = pruner.score(vlm, p), pruner.generate(vlm, p, 0.25, max_new_tokens=3)
    seen = []
    hook = comp.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].device))
    try:
        with FakeDevices():
            to_device(vlm.model, FAKE)
            scores = pruner.score(vlm, p)
            assert seen == [FAKE] and next(comp.parameters()).device == FAKE
            assert scores.device == CPU
            torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-5)
            assert pruner.generate(vlm, p, 0.25, max_new_tokens=3).token_ids == ref.token_ids
            assert first_layer_attention(vlm, p).device == CPU
            assert first_layer_attention(vlm, p, keep_device=True).device == FAKE
    finally:
        hook.remove()


class _DeviceKeep(Pruner):
    """A custom pruner returning ``keep`` on the fake device (as a CUDA-side selection would)."""

    def score(self, vlm, prompt):
        return torch.linspace(0, 1, prompt.num_visual, device=FAKE)

    def keep(self, vlm, prompt, ratio):
        return torch.arange(prompt.num_visual - 1, -1, -3, device=FAKE)  # unsorted, on the device


class _DeviceScores(Pruner):
    def score(self, vlm, prompt):
        return torch.linspace(0, 1, prompt.num_visual, device=FAKE)


def test_custom_pruners_may_return_keep_or_scores_on_any_device(deep_dirs):
    vlm = explainprune.load(deep_dirs("llava"))
    p = prompts(vlm)[0]
    n = p.num_visual
    ref_keep = vlm.generate(p, keep=torch.arange(n - 1, -1, -3).sort().values, max_new_tokens=3)
    ref_scores = vlm.generate(p, keep=torch.arange(n - n // 2, n), max_new_tokens=3)
    with FakeDevices():
        assert _DeviceKeep().generate(vlm, p, 0.5, max_new_tokens=3).token_ids == ref_keep.token_ids
        keep = _DeviceScores().keep(vlm, p, 0.5)
        assert keep.device == CPU and keep.tolist() == list(range(n - n // 2, n))
        assert select(torch.arange(4.0, device=FAKE), 0.5).device == CPU
        assert _DeviceScores().generate(vlm, p, 0.5, max_new_tokens=3).token_ids == ref_scores.token_ids
        # VLM.generate itself takes keep on any device
        assert vlm.generate(p, keep=torch.arange(n - n // 2, n).to(FAKE), max_new_tokens=3).token_ids == \
            ref_scores.token_ids


def test_as_keep_normalises_and_checks():
    assert as_keep(None, 4) is None
    assert as_keep([3, 1, 1], 4).tolist() == [1, 3]
    assert as_keep(torch.tensor([2], dtype=torch.int32), 4).dtype == torch.long
    with pytest.raises(ValueError, match="outside 0..3"):
        as_keep([4], 4)
    with pytest.raises(ValueError, match="not a mask"):
        as_keep(torch.ones(4, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="integer indices"):
        as_keep(torch.rand(2), 4)


def test_train_on_another_device_equals_cpu(tmp_path, monkeypatch):
    """``train(..., device=...)``: f_θ, its batches and Adam's state live there; same weights and metrics as
    on CPU, also when a CPU run is resumed on the device."""
    from explainprune.labels import LabelConfig, label
    from explainprune.train import TrainConfig, train
    from test_labels import FakeVLM
    from test_train import SMALL, ToyLabeler, ToySource

    labels = tmp_path / "labels"
    label(FakeVLM(), ToySource(24), labels, LabelConfig(shard_size=8), labeler=ToyLabeler(), progress=False)
    config = TrainConfig(epochs=2, **{**SMALL, "batch_size": 6})
    ref = train(labels, tmp_path / "cpu", config, progress=False)
    train(labels, tmp_path / "part", TrainConfig(epochs=1, **{**SMALL, "batch_size": 6}), progress=False)
    seen = set()
    original = Compressor.log_probs

    def log_probs(self, attention, mask=None):
        seen.update({next(self.parameters()).device, attention.device, mask.device})
        return original(self, attention, mask)

    monkeypatch.setattr(Compressor, "log_probs", log_probs)
    with FakeDevices():
        got = train(labels, tmp_path / "dev", config, progress=False, device=FAKE)
        resumed = train(labels, tmp_path / "part", config, resume=True, progress=False, device=FAKE)
    assert seen == {FAKE}
    assert got.metrics == ref.metrics and resumed.metrics == ref.metrics
    a = Compressor.from_pretrained(tmp_path / "cpu" / "compressor").state_dict()
    for run in ("dev", "part"):
        b = Compressor.from_pretrained(tmp_path / run / "compressor").state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_module_device_reads_accelerate_hooks():
    """A layer dispatched by accelerate computes on its hook's execution device, whatever its weights'
    device (meta when CPU-offloaded); otherwise on its parameters' device."""
    from types import SimpleNamespace

    layer = torch.nn.Linear(2, 2, device="meta")
    assert module_device(layer) == torch.device("meta")
    layer._hf_hook = SimpleNamespace(execution_device="cuda:1")
    assert module_device(layer) == torch.device("cuda", 1)
    layer._hf_hook = SimpleNamespace(execution_device=0)
    assert module_device(layer).index == 0 and module_device(layer).type != "meta"
    assert module_device(torch.nn.ReLU()) == CPU
