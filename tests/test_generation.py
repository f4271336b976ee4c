"""Pruned generation: equal to the full sequence with the dropped visual tokens masked out of attention,
and ragged batches equal to the same prompts one by one."""

from __future__ import annotations

import torch

from explainprune import get_pruner


@torch.no_grad()
def masked_reference(vlm, prompt, keep, steps: int) -> torch.Tensor:
    """Greedy decode on the FULL sequence, dropped visual tokens masked out of attention, no cache (their
    DeepStack rows, for Qwen3-VL, are added to masked positions: they reach no other token).

    Returns the logits of every step: Tensor[steps, vocab].
    """
    embeds, pos, mask = prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask.clone()
    dropped = torch.ones(prompt.num_visual, dtype=torch.bool)
    dropped[keep] = False
    mask[0, prompt.visual_pos[dropped]] = 0
    table = vlm.model.get_input_embeddings()
    out = []
    for _ in range(steps):
        logits = vlm.forward(embeds, pos, mask, prompt=prompt, use_cache=False).logits  # + DeepStack rows
        last = logits[0, -1]
        out.append(last)
        token = last.argmax()
        embeds = torch.cat([embeds, table(token.view(1, 1))], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    return torch.stack(out)


def test_pruned_generation_equals_masked_full_sequence(vlm, image):
    p = vlm.prepare(images=image, question="what digit is in row 2 column 3 ?")
    keep = get_pruner("random", seed=1).keep(vlm, p, 0.3)
    assert 0 < len(keep) < p.num_visual
    out = vlm.generate(p, keep=keep, max_new_tokens=6, output_logits=True)
    ref = masked_reference(vlm, p, keep, len(out.token_ids))
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert out.token_ids == ref.argmax(-1).tolist()
    assert out.visual_tokens == len(keep)
    assert out.prompt_tokens == p.length - p.num_visual + len(keep)


def test_pruned_video_generation_equals_masked_full_sequence(vlm, frames):
    p = vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?")
    keep = get_pruner("uniform").keep(vlm, p, 0.25)
    out = vlm.generate(p, keep=keep, max_new_tokens=5, output_logits=True)
    ref = masked_reference(vlm, p, keep, len(out.token_ids))
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)


def test_ragged_batch_equals_one_by_one(vlm, image, frames):
    prompts = [
        vlm.prepare(images=image, question="what digit is in row 2 column 3 ?"),
        vlm.prepare(images=image, question="how many 7 are there ?"),
        vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?"),
    ]
    keeps = [get_pruner("random", seed=3).keep(vlm, prompts[0], 0.5),
             get_pruner("uniform").keep(vlm, prompts[1], 0.1), None]
    batch = vlm.generate(prompts, keep=keeps, max_new_tokens=6, output_logits=True)
    for p, k, b in zip(prompts, keeps, batch):
        alone = vlm.generate(p, keep=k, max_new_tokens=6, output_logits=True)
        assert b.token_ids == alone.token_ids
        torch.testing.assert_close(b.logits, alone.logits, atol=1e-4, rtol=0)


def test_pruner_generate_runs_the_registry_method(vlm, image):
    p = vlm.prepare(images=image, question="what digit is in row 2 column 3 ?")
    pruned = get_pruner("uniform").generate(vlm, p, ratio=0.5, max_new_tokens=4)
    keep = get_pruner("uniform").keep(vlm, p, 0.5)
    assert pruned.token_ids == vlm.generate(p, keep=keep, max_new_tokens=4).token_ids
    full = get_pruner("vanilla").generate(vlm, p, ratio=0.1, max_new_tokens=4)
    assert full.token_ids == vlm.generate(p, max_new_tokens=4).token_ids
