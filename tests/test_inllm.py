"""PyramidDrop and DART (the shared in-LLM machinery) equal a literal reference: the full sequence, no
cache, every dropped visual token masked from its stage's layer on; ragged batches equal one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explainprune
from explainprune.evaluation.flops import kept_count
from explainprune.pruning.dart import DART, duplication_select, quotas
from explainprune.pruning.inllm import top_k
from explainprune.pruning.pdrop import (
    PyramidDrop,
    authors_schedule,
    average_retention,
    default_layers,
    solve_lambda,
    stage_count,
)
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


@torch.no_grad()
def reference(eager, prompt, choosers: dict, steps: int):
    """Greedy decode re-running the FULL sequence each step; at each stage layer K, ``choosers[K](info)``
    picks (among the remaining visual indices) what survives, and from layer K on the others are masked
    for every query. info: hidden entering K, layer K's attention weights under the earlier masks, layer
    K-1's k_proj output, the remaining indices. Returns (kept after each stage, logits [steps, vocab])."""
    lm, model = eager.language_model, eager.model
    embeds, pos = prompt.inputs_embeds, prompt.position_ids
    n_v, vis = prompt.num_visual, prompt.visual_pos
    table = model.get_input_embeddings()
    neg = torch.finfo(embeds.dtype).min
    seen: dict[str, torch.Tensor] = {}
    handles = [lm.layers[i].self_attn.register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(f"w{i}", out[1])) for i in range(len(lm.layers))]
    handles += [lm.layers[i].self_attn.k_proj.register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(f"k{i}", out)) for i in range(len(lm.layers))]
    dropped_from: dict[int, torch.Tensor] = {}  # layer -> visual indices masked from it on
    kept_after, logits = [], []
    try:
        for step in range(steps):
            n = embeds.shape[1]
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            rope = lm.rotary_emb(embeds, pos)
            h = embeds
            remaining = torch.arange(n_v)
            for i, layer in enumerate(lm.layers):
                if step == 0 and i in choosers:  # weights before the drop:
                    layer(h, attention_mask=_mask(causal, dropped_from, vis, i - 1, neg), position_embeddings=rope)
                    info = {"hidden": h, "weights": seen[f"w{i}"], "k_prev": seen[f"k{i - 1}"],
                            "remaining": remaining}
                    keep = torch.sort(choosers[i](info)).values
                    dropped_from[i] = remaining[~torch.isin(remaining, keep)]
                    remaining = keep
                    kept_after.append(keep)
                if dropped_from:
                    remaining = torch.tensor([j for j in range(n_v) if not any(
                        j in d.tolist() for k, d in dropped_from.items() if k <= i)], dtype=torch.long)
                h = layer(h, attention_mask=_mask(causal, dropped_from, vis, i, neg), position_embeddings=rope)
                if i in prompt.visual_residuals:  # Qwen3-VL DeepStack: added at every visual row (dropped ones
                    h = h.clone()                 # too: masked, they reach no other token)
                    h[0, vis] += prompt.visual_residuals[i]
            last = model.lm_head(lm.norm(h))[0, -1]
            logits.append(last)
            embeds = torch.cat([embeds, table(last.argmax().view(1, 1))], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    finally:
        for hd in handles:
            hd.remove()
    return kept_after, torch.stack(logits)


def _mask(causal, dropped_from: dict, vis, upto: int, neg: float):
    """Additive [1, 1, n, n] mask: causal, with the visual tokens dropped at stages <= ``upto`` hidden."""
    m = causal.clone()
    for k, d in dropped_from.items():
        if k <= upto:
            m[:, vis[d]] = False
    return torch.zeros(1, 1, *m.shape).masked_fill(~m, neg)


def pdrop_choosers(prompt, layers, shares):
    def make(share):
        def choose(info):
            att = info["weights"][0, :, -1].mean(0)[prompt.visual_pos[info["remaining"]]]
            return info["remaining"][top_k(att, stage_count(prompt.num_visual, share))]
        return choose
    return {k: make(s) for k, s in zip(layers, shares)}


@pytest.mark.parametrize("ratio", [0.6, 0.35])
def test_pdrop_equals_masked_reference(deep, family, ratio):
    vlm, eager = deep(family)
    p = vlm.prepare(images=random_image(0), question=QUESTION)
    pruner = explainprune.get_pruner("pdrop", positions="original")  # the reference keeps original positions
    out = pruner.generate(vlm, p, ratio, max_new_tokens=4, output_logits=True)
    lam = solve_lambda(ratio, (1, 2, 3), 4)
    assert 0 < lam < 1 and pruner.layer == 1
    kept, ref = reference(eager, p, pdrop_choosers(p, (1, 2, 3), [lam, lam**2, lam**3]), len(out.token_ids))
    assert out.keep.tolist() == kept[-1].tolist()
    assert out.visual_per_layer == [p.num_visual] + [len(k) for k in kept]
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert out.token_ids == ref.argmax(-1).tolist()
    # the average retention reached is the ratio, up to the rounding of the kept counts
    assert sum(out.visual_per_layer) / (4 * p.num_visual) == pytest.approx(ratio, abs=3 / p.num_visual)


def test_pdrop_schedule_authors_defaults():
    assert default_layers(32) == (8, 16, 24) and default_layers(28) == (7, 14, 21) and default_layers(4) == (1, 2, 3)
    # the authors' λ = 0.5 on LLaVA-1.5 (32 layers, 8/16/24): average retention (1 + .5 + .25 + .125) / 4
    assert average_retention(0.5, (8, 16, 24), 32) == pytest.approx(0.46875)
    assert solve_lambda(0.46875, (8, 16, 24), 32) == pytest.approx(0.5, abs=1e-9)
    assert solve_lambda(0.1, (8, 16, 24), 32) == 0.0  # below K_1 / L = 25%: out of reach for that rule
    # the default schedule: the authors' own setting at their average, λ = 0.5 with earlier boundaries below
    assert authors_schedule(0.46875, 32) == ((8, 16, 24), pytest.approx(0.5, abs=1e-9))
    assert authors_schedule(0.25, 28) == ((3, 6, 9), 0.5)
    ks, lam = authors_schedule(0.10, 28)
    assert ks == (1, 2, 3) and 0.3 < lam < 0.5
    assert PyramidDrop(schedule="solve").plan(28, 0.25) == ((7, 14, 21), 0.0)  # the former rule collapses
    with pytest.raises(ValueError, match="lam"):
        PyramidDrop(lam=1.5)
    with pytest.raises(ValueError, match="positions"):
        PyramidDrop(positions="shifted")


def test_pdrop_never_collapses_and_costs_less_at_lower_ratio():
    """28 layers (Qwen2-VL-7B's LLM), 576 visual tokens: 25% and 10% keep > 1 token at every stage and 10%
    sees fewer visual tokens in total; the average retention reached is near the nominal ratio."""
    pd = PyramidDrop()
    at25, at10 = pd.tokens_per_layer(576, 0.25, 28), pd.tokens_per_layer(576, 0.10, 28)
    assert min(at25) > 1 and min(at10) > 1 and sum(at10) < sum(at25)
    assert at25 == [576] * 3 + [288] * 3 + [144] * 3 + [72] * 19  # λ = 0.5, int(576 λ^s)
    assert abs(sum(at25) / (28 * 576) - 0.25) < 0.03 and abs(sum(at10) / (28 * 576) - 0.10) < 0.01
    assert PyramidDrop(lam=0.5).tokens_per_layer(576, 0.1, 32) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    # out of reach (4 layers: layer 0 alone is 25%): the last stage keeps ratio * N_v, never one token
    assert PyramidDrop().tokens_per_layer(100, 0.25, 4) == [100, 62, 39, 25]
    assert PyramidDrop().tokens_per_layer(100, 0.10, 4) == [100, 46, 21, 10]


def test_pdrop_kv_cache_per_stage(deep):
    vlm, _ = deep("qwen2_vl")
    p = vlm.prepare(images=random_image(1), question=QUESTION)
    seen = {}

    def after(module, args, output):
        seen.setdefault("cache", [lay.keys.shape[-2] for lay in output.past_key_values.layers])

    handle = vlm.model.register_forward_hook(after)
    try:
        out = PyramidDrop().generate(vlm, p, 0.5, max_new_tokens=3)
    finally:
        handle.remove()
    assert out.visual_per_layer == PyramidDrop().tokens_per_layer(p.num_visual, 0.5, 4)
    text = p.length - p.num_visual
    assert seen["cache"] == [text + n for n in out.visual_per_layer]
    assert out.visual_per_layer[0] == p.num_visual and out.visual_per_layer[1] > out.visual_per_layer[3]


def dart_choosers(vlm, prompt, layer, ratio, n_img=4, n_txt=4):
    def choose(info):
        lm = vlm.language_model
        feats = lm.norm(info["hidden"])[0].float()
        keys = info["k_prev"][0]
        attn = lm.layers[layer - 1].self_attn
        if hasattr(attn, "k_norm"):  # Qwen3: the key states after the per-head norm
            keys = attn.k_norm(keys.view(keys.shape[0], -1, attn.head_dim)).flatten(1)
        l1 = keys.float().abs().sum(-1)
        vis, k = prompt.visual_pos, kept_count(prompt.num_visual, ratio)
        text = torch.arange(int(vis.max()) + 1, prompt.length)
        img_piv = torch.argsort(-l1[vis], stable=True)[:min(n_img, k)]
        txt_piv = text[torch.argsort(-l1[text], stable=True)[:n_txt]]
        pivots = torch.cat([vis[img_piv], txt_piv])
        return duplication_select(feats[vis], feats[pivots], img_piv, k)
    return {layer: choose}


@pytest.mark.parametrize("layer,ratio", [(2, 0.25), (1, 0.5)])
def test_dart_equals_masked_reference(deep, family, layer, ratio):
    vlm, eager = deep(family)
    p = vlm.prepare(images=random_image(2), question=QUESTION)
    # this implementation's options (exact budget, keys before RoPE, pivots by norm); authors: test_authors_dart
    dart = explainprune.get_pruner("dart", layer=layer, budget="exact", keys="raw", order="norm")
    out = dart.generate(vlm, p, ratio, max_new_tokens=4, output_logits=True)
    kept, ref = reference(eager, p, dart_choosers(vlm, p, layer, ratio), len(out.token_ids))
    assert out.keep.tolist() == kept[0].tolist() and len(out.keep) == kept_count(p.num_visual, ratio)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert out.visual_per_layer == [p.num_visual] * layer + [len(out.keep)] * (4 - layer)


def test_duplication_select_hand_made():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([e1, e1 + 0.1 * e2, e2, -e1, e1 + e2])  # cos to e1: 1, .995, 0, -1, .707
    # one pivot (token 0, kept): the two least similar to it are -e1 and e2
    assert duplication_select(feats, feats[:1], torch.tensor([0]), 3).tolist() == [0, 2, 3]
    # pivots e1 (quota 2: -e1, e2) then e2 (quota 1: of {e1+.1e2, e1+e2} the least similar to e2)
    assert duplication_select(feats, torch.stack([e1, e2]), torch.tensor([0]), 4).tolist() == [0, 1, 2, 3]
    assert quotas(7, 3) == [3, 2, 2] and quotas(0, 2) == [0, 0]
    assert F.cosine_similarity(feats[1], e2, dim=0) < F.cosine_similarity(feats[4], e2, dim=0)


@pytest.mark.parametrize("name", ["pdrop", "dart"])
def test_ragged_batch_equals_one_by_one(deep, frames, name):
    vlm, _ = deep("qwen2_vl")
    prompts = [vlm.prepare(images=random_image(4, (56, 84)), question=QUESTION),
               vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?"),
               vlm.prepare(images=random_image(5), question="how many 7 are there ?")]
    pruner = explainprune.get_pruner(name)
    batch = pruner.generate(vlm, prompts, 0.4, max_new_tokens=4, output_logits=True)
    for p, b in zip(prompts, batch):
        alone = pruner.generate(vlm, p, 0.4, max_new_tokens=4, output_logits=True)
        assert b.keep.tolist() == alone.keep.tolist() and b.token_ids == alone.token_ids
        assert b.visual_per_layer == alone.visual_per_layer
        torch.testing.assert_close(b.logits, alone.logits, atol=1e-4, rtol=0)


def test_hooks_removed_and_bad_layers(deep):
    vlm, _ = deep("llava")
    p = vlm.prepare(images=random_image(3), question=QUESTION)
    modules = list(vlm.model.modules())
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)
    with pytest.raises(ValueError, match="increasing"):
        PyramidDrop(layers=(2, 1)).generate(vlm, p, 0.5)
    with pytest.raises(ValueError, match="1..3"):
        DART(layer=4).generate(vlm, p, 0.5)
    DART().keep(vlm, p, 0.5)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules) == before
