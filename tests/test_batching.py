"""Ragged batches: the kept tokens' ids are padded exactly as their embeddings (the logits processors read
the ids, the model the embeddings)."""

from __future__ import annotations

import pytest
import torch

from explainprune import get_pruner
from explainprune.models.batching import kept_rows, pad_left, pad_left_ids


def ragged(vlm, image, frames):
    prompts = [
        vlm.prepare(images=image, question="what digit is in row 2 column 3 ?"),
        vlm.prepare(images=image, question="how many 7 are there ?"),
        vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?"),
    ]
    keeps = [get_pruner("random", seed=3).keep(vlm, prompts[0], 0.5),
             get_pruner("uniform").keep(vlm, prompts[1], 0.1), None]
    return prompts, keeps


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_ids_are_padded_as_the_embeddings(load_tiny, family, image, frames):
    vlm = load_tiny(family)
    prompts, keeps = ragged(vlm, image, frames)
    embeds, mask, _ = pad_left(prompts, keeps)
    ids = pad_left_ids(prompts, keeps, pad_id=-5)
    assert ids.shape == mask.shape
    assert torch.equal(ids != -5, mask.bool())  # the same rows are padding
    for b, (p, r) in enumerate(zip(prompts, kept_rows(prompts, keeps))):
        row = ids[b][mask[b].bool()]
        assert torch.equal(row, p.input_ids[0, r])  # each embedding row's own token id, in the same place
        torch.testing.assert_close(embeds[b][mask[b].bool()], p.inputs_embeds[0, r])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_ragged_batch_with_no_repeat_ngram_equals_one_by_one(load_tiny, family, image, frames):
    """``no_repeat_ngram_size`` bans tokens from the ids' history: a batch row whose ids were padded
    otherwise than its embeddings bans other tokens than the prompt alone does."""
    vlm = load_tiny(family)
    prompts, keeps = ragged(vlm, image, frames)
    batch = vlm.generate(prompts, keep=keeps, max_new_tokens=12, no_repeat_ngram_size=2)
    free = vlm.generate(prompts, keep=keeps, max_new_tokens=12)
    assert any(b.token_ids != f.token_ids for b, f in zip(batch, free))  # the processor is at work here
    for p, k, b in zip(prompts, keeps, batch):
        alone = vlm.generate(p, keep=k, max_new_tokens=12, no_repeat_ngram_size=2)
        assert b.token_ids == alone.token_ids
