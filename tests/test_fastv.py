"""FastV equals a literal reference: full sequence, no cache, dropped tokens masked from layer K on."""

from __future__ import annotations

import pytest
import torch

import explainprune
from explainprune.pruning.base import select
from explainprune.pruning.fastv import FastV, FastVResult, fastv_hooks
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


@torch.no_grad()
def reference(eager, prompt, layer: int, ratio: float, steps: int):
    """Eager attentions rank the tokens; then greedy decode re-running the FULL sequence each step, with
    per-layer 4-D masks that hide the dropped visual tokens from layer ``layer`` on. Returns
    (scores [N_v], keep, logits [steps, vocab])."""
    lm, model = eager.language_model, eager.model
    out = eager.forward(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask, prompt=prompt,
                        output_attentions=True, use_cache=False)
    scores = out.attentions[layer - 1][0, :, -1].mean(0)[prompt.visual_pos]
    keep = select(scores, ratio)
    dropped = torch.ones(prompt.num_visual, dtype=torch.bool)
    dropped[keep] = False
    dropped_cols = prompt.visual_pos[dropped]
    embeds, pos = prompt.inputs_embeds, prompt.position_ids
    table = model.get_input_embeddings()
    neg = torch.finfo(embeds.dtype).min
    logits = []
    for _ in range(steps):
        n = embeds.shape[1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        pruned = causal.clone()
        pruned[:, dropped_cols] = False
        masks = [torch.zeros(1, 1, n, n).masked_fill(~m, neg) for m in (causal, pruned)]
        rope = lm.rotary_emb(embeds, pos)
        h = embeds
        for i, decoder_layer in enumerate(lm.layers):
            h = decoder_layer(h, attention_mask=masks[int(i >= layer)], position_embeddings=rope)
            if i in prompt.visual_residuals:  # Qwen3-VL DeepStack: added at every visual row (dropped ones
                h = h.clone()                 # too: masked, they reach no other token)
                h[0, prompt.visual_pos] += prompt.visual_residuals[i]
        last = model.lm_head(lm.norm(h))[0, -1]
        logits.append(last)
        embeds = torch.cat([embeds, table(last.argmax().view(1, 1))], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    return scores, keep, torch.stack(logits)


@pytest.mark.parametrize("layer,ratio", [(2, 0.25), (1, 0.5)])
def test_fastv_equals_masked_reference(deep, family, layer, ratio):
    vlm, eager = deep(family)
    p = vlm.prepare(images=random_image(0), question=QUESTION)
    out = FastV(layer=layer).generate(vlm, p, ratio, max_new_tokens=5, output_logits=True)
    assert isinstance(out, FastVResult)
    scores, keep, ref = reference(eager, p, layer, ratio, len(out.token_ids))
    torch.testing.assert_close(FastV(layer=layer).score(vlm, p), scores, atol=1e-6, rtol=1e-4)
    assert out.keep.tolist() == keep.tolist()
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert out.token_ids == ref.argmax(-1).tolist()
    kept_len = p.length - p.num_visual + len(keep)
    assert out.visual_tokens == len(keep) and out.prompt_tokens == kept_len
    assert out.layer_tokens == [p.length] * layer + [kept_len] * (4 - layer)


def test_fastv_video_and_cache_lengths(deep, frames):
    vlm, eager = deep("qwen2_vl")
    p = vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?")
    seen = {}

    def after(module, args, output):  # the first call is the prefill
        seen.setdefault("cache", [lay.keys.shape[-2] for lay in output.past_key_values.layers])

    handle = vlm.model.register_forward_hook(after)
    try:
        out = get_fastv(3).generate(vlm, p, 0.1, max_new_tokens=4, output_logits=True)
    finally:
        handle.remove()
    _, keep, ref = reference(eager, p, 3, 0.1, len(out.token_ids))
    assert out.keep.tolist() == keep.tolist()
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    kept_len = p.length - p.num_visual + len(keep)
    assert seen["cache"] == [p.length] * 3 + [kept_len]  # the KV cache of layers >= K is pruned too


def get_fastv(layer: int) -> FastV:
    pruner = explainprune.get_pruner("fastv", layer=layer)
    assert isinstance(pruner, FastV) and pruner.layer == layer and pruner.name == "fastv"
    return pruner


def test_full_ratio_equals_vanilla_and_default_layer(deep):
    vlm, _ = deep("llava")
    p = vlm.prepare(images=random_image(1), question=QUESTION)
    assert FastV().layer == 2
    out = FastV().generate(vlm, p, 1.0, max_new_tokens=4, output_logits=True)
    base = vlm.generate(p, max_new_tokens=4, output_logits=True)
    assert out.token_ids == base.token_ids
    torch.testing.assert_close(out.logits, base.logits, atol=1e-5, rtol=0)
    assert FastV().keep(vlm, p, 0.5).tolist() == select(FastV().score(vlm, p), 0.5).tolist()


def test_hooks_removed_after_errors(deep):
    vlm, _ = deep("qwen2_vl")
    p = vlm.prepare(images=random_image(2), question=QUESTION)
    modules = list(vlm.model.modules())

    def counts():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)

    before = counts()
    with pytest.raises(RuntimeError, match="boom"), fastv_hooks(vlm, p, 0.5, 2):
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="1..3"):
        FastV(layer=4).generate(vlm, p, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        FastV(layer=2).generate(vlm, p, 0.0)
    FastV(layer=2).keep(vlm, p, 0.5)
    assert counts() == before


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava"])  # one M-RoPE and one 1-D family
def test_eager_attention_slices_the_4d_masks(deep, fam):
    """Eager attention gets materialised 4-D masks (sdpa gets None here): their rows and columns are sliced."""
    vlm, eager = deep(fam)
    p = vlm.prepare(images=random_image(3), question=QUESTION)
    seen = []
    hook = eager.language_model.layers[3].self_attn.register_forward_pre_hook(  # sees the sliced inputs
        lambda m, a, k: seen.append(tuple(k["attention_mask"].shape)), with_kwargs=True)
    try:
        out = FastV(layer=2).generate(eager, p, 0.25, max_new_tokens=4, output_logits=True)
    finally:
        hook.remove()
    _, keep, ref = reference(eager, p, 2, 0.25, len(out.token_ids))
    assert out.keep.tolist() == keep.tolist()
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    kept_len = p.length - p.num_visual + len(keep)
    assert seen[0] == (1, 1, kept_len, kept_len) and seen[1] == (1, 1, 1, kept_len + 1)


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava_onevision"])
def test_ragged_batch_equals_one_by_one(deep, fam, frames):
    """Left-padded prompts of different lengths, re-padded after layer K, equal FastV on each alone."""
    vlm, _ = deep(fam)
    prompts = [vlm.prepare(images=random_image(4, (56, 84)), question=QUESTION),
               vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?"),
               vlm.prepare(images=random_image(5), question="how many 7 are there ?")]
    assert len({p.length for p in prompts}) == 3
    batch = FastV(layer=2).generate(vlm, prompts, 0.25, max_new_tokens=5, output_logits=True)
    for p, b in zip(prompts, batch):
        alone = FastV(layer=2).generate(vlm, p, 0.25, max_new_tokens=5, output_logits=True)
        assert b.keep.tolist() == alone.keep.tolist() and b.token_ids == alone.token_ids
        torch.testing.assert_close(b.logits, alone.logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_fastv_ranks_with_layer_k_minus_1_by_value(deep):
    """A case where layers K-1 and K rank the visual tokens differently: FastV's kept set is layer K-1's.
    Layer K's queries are scaled up (sharper attention there), so the two rankings surely differ."""
    vlm, eager = deep("qwen2_vl")
    layer, ratio = 2, 0.25
    p = vlm.prepare(images=random_image(0), question=QUESTION)
    attn = [eager.language_model.layers[i].self_attn for i in (layer - 1, layer)]
    saved = [a.q_proj.weight.clone() for a in attn]
    try:
        for a, sign in zip(attn, (1.0, -4.0)):
            a.q_proj.weight.mul_(sign)
        out = eager.model(inputs_embeds=p.inputs_embeds, position_ids=p.position_ids,
                          attention_mask=p.attention_mask, output_attentions=True, use_cache=False)
        per_layer = [out.attentions[i][0, :, -1].mean(0)[p.visual_pos] for i in (layer - 1, layer)]
        keep_k1, keep_k = (select(s, ratio).tolist() for s in per_layer)
        assert keep_k1 != keep_k  # the case discriminates
        torch.testing.assert_close(FastV(layer=layer).score(eager, p), per_layer[0], atol=1e-6, rtol=1e-4)
        assert FastV(layer=layer).keep(eager, p, ratio).tolist() == keep_k1
    finally:
        for a, w in zip(attn, saved):
            a.q_proj.weight.copy_(w)
