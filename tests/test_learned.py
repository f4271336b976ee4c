"""The learned pruner: A_v^0 -> f_θ -> select -> generate, fingerprint check, longer inputs than trained."""

from __future__ import annotations

import pytest
import torch

import explainprune.pruning.learned  # noqa: F401  (registers "learned" until pruning/__init__ imports it)
from explainprune.compressor import Compressor
from explainprune.pruning import get_pruner, select
from explainprune.testing import random_image
from explainprune.train import TrainConfig, topk_recall, train

pytest.importorskip("explainprune.attention")



def _compressor_for(vlm, **extra):
    torch.manual_seed(0)
    return Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8, 8, 8, 8, 8),
                      fingerprint=vlm.fingerprint(), **extra)


def test_learned_scores_and_generates(load_tiny, image, tmp_path):
    from explainprune.attention import first_layer_attention

    vlm = load_tiny("qwen2_vl")
    f = _compressor_for(vlm)
    prompt = vlm.prepare(images=image, question="what digit is in row 1 , column 2 ?")
    pruner = get_pruner("learned", compressor=f)
    s = pruner.score(vlm, prompt)
    torch.testing.assert_close(s, f(first_layer_attention(vlm, prompt)).detach())
    assert s.shape == (prompt.num_visual,) and abs(float(s.sum()) - 1) < 1e-5
    keep = pruner.keep(vlm, prompt, 0.25)
    assert torch.equal(keep, select(s, 0.25))
    out = pruner.generate(vlm, prompt, 0.25, max_new_tokens=3)
    ref = vlm.generate(prompt, keep=keep, max_new_tokens=3)
    assert out.token_ids == ref.token_ids and out.visual_tokens == len(keep)
    f.save_pretrained(tmp_path / "c")  # a directory works as well
    torch.testing.assert_close(get_pruner("learned", compressor=str(tmp_path / "c")).score(vlm, prompt), s)


def test_fingerprint_mismatch_is_refused(load_tiny, image):
    vlm = load_tiny("qwen2_vl")
    f = Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8, 8, 8, 8, 8),
                   fingerprint={**vlm.fingerprint(), "hidden_size": 4096})
    prompt = vlm.prepare(images=image, question="what digit is in row 1 , column 2 ?")
    with pytest.raises(ValueError, match="hidden_size: trained for 4096"):
        get_pruner("learned", compressor=f).generate(vlm, prompt, 0.5)


def test_needs_a_compressor():
    with pytest.raises(ValueError, match="needs compressor"):
        get_pruner("learned")


def test_longer_input_than_any_seen_in_training(tmp_path, load_tiny):
    """Trained on N_v <= 30 (toy labels), f_θ still ranks a 600-token input well (Section 4.3), and the
    pruner runs on a real prompt larger than those."""
    from explainprune.labels import LabelConfig, LabelSample, label
    from test_labels import FakeVLM
    from test_train import ToyLabeler, ToySource

    label(FakeVLM(), ToySource(48), tmp_path / "l", LabelConfig(shard_size=16), labeler=ToyLabeler(),
          progress=False)
    # the v1 options (mean-normalised input, zero padding, no skip, last epoch): with the issue-20 default this
    # toy (R_v follows head 0 alone, not the head mean the skip path starts from) reaches 0.71 in 20 epochs
    cfg = TrainConfig(epochs=20, batch_size=8, val_fraction=0.25, lr=3e-3, channels=(8, 16, 16, 32, 32), skip=False,
                      normalize="mean", padding="zeros", select="last")
    res = train(tmp_path / "l", tmp_path / "t", cfg, progress=False)
    f = Compressor.from_pretrained(tmp_path / "t" / "compressor")
    long = LabelSample("s999", "q", "a", images=(1, 20, 30))  # 600 tokens, 20x longer than training
    out = ToyLabeler()(FakeVLM(), FakeVLM().prepare(long.images), long)
    recall = topk_recall(f(out.attention).detach(), out.relevance, 0.25)
    assert recall > 0.8 and recall >= res.metrics["recall@0.25"] - 0.1

    vlm = load_tiny("qwen2_vl")
    big = vlm.prepare(images=random_image(3, (224, 224)), question="what digit is in row 1 , column 2 ?")
    g = _compressor_for(vlm)
    assert big.num_visual > 30
    keep = get_pruner("learned", compressor=g).keep(vlm, big, 0.1)
    assert len(keep) == -(-big.num_visual // 10)
