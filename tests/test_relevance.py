"""Relevance engine (Eq. 1) against a literal implementation of Eq. 1, on every model family."""

from __future__ import annotations

import pytest
import torch

from explainprune.attention import eager_attention
from explainprune.relevance import RULES, answer_ids, relevance, teacher_forced


def literal_relevance(vlm, prompt, ids: list[int], rule: str = "grad", clamp: bool = True) -> torch.Tensor:
    """Eq. 1 exactly as printed: full n x n R_t, every layer's attention held, folded from layer 0 up.

    For each answer token y_t: R_t = I; for l = 0..L-1: R_t = R_t + E_h(A^l ⊙ ∇A^l) R_t (positive part
    before the head mean when ``clamp``; E_h(A^l) for rule "mean"); token relevance = R_t[p_t, visual].
    Returns Tensor[T, N_v].
    """
    embeds, pos, mask, rows = teacher_forced(vlm, prompt, ids)
    embeds = embeds.detach().clone().requires_grad_(True)
    with eager_attention(vlm):
        out = vlm.forward(embeds, pos, mask, prompt=prompt, output_attentions=True, use_cache=False)
    attentions = out.attentions
    for a in attentions:
        a.retain_grad()
    n = embeds.shape[1]
    result = []
    for row, y in zip(rows.tolist(), ids):
        for a in attentions:
            a.grad = None
        if rule == "grad":
            out.logits[0, row, y].backward(retain_graph=True)
        R = torch.eye(n)
        for a in attentions:
            if rule == "grad":
                cam = a.detach()[0] * a.grad[0]
                if clamp:
                    cam = cam.clamp(min=0)
            else:
                cam = a.detach()[0]
            R = R + cam.mean(0) @ R
        result.append(R[row, prompt.visual_pos])
    return torch.stack(result)


def _hook_snapshot(model) -> dict[str, tuple]:
    """Every module's forward / pre-forward / backward hooks, by module name."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
            for name, m in model.named_modules()}


@pytest.fixture
def prompt(vlm, image):
    return vlm.prepare(images=image, question="what is in the picture")


@pytest.mark.parametrize("rule,clamp", [("grad", True), ("grad", False), ("mean", True)])
def test_engine_equals_literal_eq1(vlm, prompt, rule, clamp):
    ids = answer_ids(vlm, prompt, None, max_new_tokens=3)
    res = relevance(vlm, prompt, ids, rule=rule, clamp=clamp)  # default: one token at a time (hooks)
    ref = literal_relevance(vlm, prompt, ids, rule, clamp)
    assert res.token_scores.shape == ref.shape == (len(ids), prompt.num_visual)
    torch.testing.assert_close(res.token_scores, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.scores, ref.mean(0), rtol=1e-4, atol=1e-6)
    assert vlm.language_model.config._attn_implementation == "sdpa"


def test_batched_and_looped_backward_agree(vlm, prompt):
    """The batched vector-Jacobian path (small inputs) equals the per-token hook path."""
    ids = [5, 6, 7, 8]
    batched = relevance(vlm, prompt, ids, batch_bytes=2**40)
    looped = relevance(vlm, prompt, ids)
    torch.testing.assert_close(batched.token_scores, looped.token_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_generated_answer_is_teacher_forced_at_the_right_rows(vlm, prompt):
    res = relevance(vlm, prompt, None, max_new_tokens=4, keep_maps=True)
    embeds, pos, mask, rows = teacher_forced(vlm, prompt, res.answer_ids)
    with torch.no_grad():
        logits = vlm.forward(embeds, pos, mask, prompt=prompt).logits[0, rows]
    assert logits.argmax(-1).tolist() == res.answer_ids  # greedy answer reproduced by teacher forcing
    assert res.maps.shape == (len(res.answer_ids), embeds.shape[1])
    torch.testing.assert_close(res.maps[:, prompt.visual_pos], res.token_scores)
    assert res.to_json()["answer_ids"] == res.answer_ids


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_answer_forms_and_options(vlm, prompt):
    text = relevance(vlm, prompt, "blank system")
    ids = vlm.tokenizer("blank system", add_special_tokens=False)["input_ids"]
    assert text.answer_ids == ids
    torch.testing.assert_close(text.scores, relevance(vlm, prompt, torch.tensor(ids)).scores)
    clamped, raw = relevance(vlm, prompt, ids, clamp=True), relevance(vlm, prompt, ids, clamp=False)
    assert not torch.allclose(clamped.scores, raw.scores)
    assert (clamped.scores >= 0).all()
    mean = relevance(vlm, prompt, ids, rule="mean")
    assert not torch.allclose(mean.scores, clamped.scores)
    assert mean.rule == "mean" and mean.answer == "blank system"


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_bad_rule_lists_accepted(vlm, prompt):
    with pytest.raises(ValueError, match="accepted: 'grad', 'mean'"):
        relevance(vlm, prompt, [5], rule="gradient")
    assert RULES == ("grad", "mean")


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_no_hook_or_setting_left_after_an_exception(vlm, prompt):
    lm = vlm.language_model
    layer = lm.layers[-1]

    calls = []

    def boom(module, args, out):  # passes the recording forward, fails in the backward sweep
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")

    before = _hook_snapshot(vlm.model)  # transformers keeps its own output-capturing hooks
    handle = layer.mlp.register_forward_hook(boom)
    try:
        with pytest.raises(KeyError):
            relevance(vlm, prompt, [5, 6])
    finally:
        handle.remove()
    assert len(calls) == 2
    assert _hook_snapshot(vlm.model) == before
    assert lm.config._attn_implementation == "sdpa"
    assert vlm.model.config.vision_config._attn_implementation == "sdpa"
    # and the model still works without the hook
    relevance(vlm, prompt, [5])


def test_oracle_keeps_top_relevance(vlm, prompt):
    import explainprune.pruning.oracle  # noqa: F401  (registers "oracle")
    from explainprune.pruning import get_pruner

    oracle = get_pruner("oracle", max_new_tokens=2)
    scores = oracle.score(vlm, prompt)
    expected = relevance(vlm, prompt, None, max_new_tokens=2).scores
    torch.testing.assert_close(scores, expected)
    keep = oracle.keep(vlm, prompt, 0.25)
    k = keep.numel()
    assert k == -(-prompt.num_visual // 4)
    assert set(keep.tolist()) == set(torch.topk(expected, k).indices.tolist())
    with pytest.raises(ValueError, match="accepted"):
        get_pruner("oracle", rule="max")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_engine_holds_one_layer_attention_at_a_time(vlm, prompt):
    """Whenever a layer's attention map is computed, every earlier map is already freed."""
    import weakref

    seen, overlaps = [], []

    def watch(module, args, out):
        overlaps.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(out[1]))

    handles = [layer.self_attn.register_forward_hook(watch) for layer in vlm.language_model.layers]
    try:
        relevance(vlm, prompt, [5, 6, 7])
    finally:
        for h in handles:
            h.remove()
    layers = len(vlm.language_model.layers)
    assert len(seen) == 2 * layers  # the recording forward, then one recompute per layer
    assert overlaps == [0] * (2 * layers)


@pytest.mark.parametrize("rule,clamp", [("grad", True), ("grad", False), ("mean", True)])
def test_head_chunked_equals_default(vlm, prompt, rule, clamp):
    """head_chunk = 1, a non-divisor of H (3 of 4), H, and more than H: the default engine's numbers."""
    ids = [5, 6, 7]
    default = relevance(vlm, prompt, ids, rule=rule, clamp=clamp, keep_maps=True)
    heads = vlm.language_model.config.num_attention_heads
    assert heads == 4 and vlm.language_model.layers[0].self_attn.num_key_value_groups == 2  # GQA exercised
    for chunk in (1, 3, heads, heads + 3):
        res = relevance(vlm, prompt, ids, rule=rule, clamp=clamp, keep_maps=True, head_chunk=chunk)
        torch.testing.assert_close(res.maps, default.maps, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res.token_scores, default.token_scores, rtol=1e-5, atol=1e-7)
    assert vlm.language_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_vl"])
@pytest.mark.parametrize("rule", ["grad", "mean"])
def test_head_chunked_holds_a_chunk_of_maps(vlm, prompt, rule, monkeypatch):
    """No full H x n x n map is ever built: every map made has at most ``head_chunk`` heads."""
    import sys

    import explainprune.attention as attention

    made = []
    original = attention.head_maps

    def spy(module, query, key, mask, scaling, h0, h1):
        out = original(module, query, key, mask, scaling, h0, h1)
        made.append(out.shape[1])
        return out

    monkeypatch.setattr(attention, "head_maps", spy)
    monkeypatch.setattr(sys.modules["explainprune.relevance"], "head_maps", spy)
    weights = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1]))
               for layer in vlm.language_model.layers]
    try:
        relevance(vlm, prompt, [5, 6], rule=rule, head_chunk=3)
    finally:
        for h in handles:
            h.remove()
    assert made and set(made) == {3, 1}  # 4 heads: a chunk of 3, then 1
    assert weights and all(w is None for w in weights)  # the attention modules returned no weights


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_head_chunk_errors(vlm, prompt):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="head_chunk"):
            relevance(vlm, prompt, [5], head_chunk=bad)
    layer = vlm.language_model.layers[0]
    cls = type(layer.self_attn)
    layer.self_attn.__class__ = type("SoftcapAttention", (cls,), {})
    try:
        with pytest.raises(NotImplementedError, match="head_chunk=None"):
            relevance(vlm, prompt, [5], head_chunk=2)
    finally:
        layer.self_attn.__class__ = cls
    assert vlm.language_model.config._attn_implementation == "sdpa"
