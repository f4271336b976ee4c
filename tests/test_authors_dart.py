"""DART against a literal reading of its authors' rule (``DART.get_retained_image_token`` in
``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`` of the DART code), written here from their logic:

the key states layer K-1's attention returns (after RoPE, kv heads repeated) give each token an L1 norm
(heads concatenated); the 4 image tokens and the 4 tokens after the image with the largest norms are pivots;
the features are the final norm of the hidden states leaving layer K-1; every pivot, visited in the order of
``list(set(image_pivots + text_pivots))`` of their sequence indices, takes the int(N (1 - reduction) / 8)
candidates least cosine-similar to it; the image pivots are kept and the text pivots are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from explainprune.pruning.dart import DART, dart_budget, visiting_order
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


@torch.no_grad()
def authors_dart(vlm, prompt, layer, reduction, n_img_piv=4, n_txt_piv=4):
    """The image tokens (0-based, into the image) the authors' rule keeps."""
    lm = vlm.language_model
    seen = {}
    prev = lm.layers[layer - 1].self_attn
    hooks = [prev.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]),
                                            with_kwargs=True),
             prev.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out)),
             lm.layers[layer].register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True)]
    try:
        vlm.forward(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask, prompt=prompt, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n = prompt.length
    keys = seen["k"].view(1, n, -1, prev.head_dim)
    if hasattr(prev, "k_norm"):
        keys = prev.k_norm(keys)
    cos, sin = seen["rope"]
    keys = rotate(keys.transpose(1, 2), cos, sin)
    heads = prev.config.num_attention_heads
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)            # repeat_kv
    flat = keys.permute(0, 2, 1, 3).reshape(1, n, -1)[0]
    start, length = int(prompt.visual_pos[0]), prompt.num_visual
    assert prompt.visual_pos.tolist() == list(range(start, start + length))
    state = lm.norm(seen["h"])[0]
    topk_per_pivot = int(length * (1 - reduction) / (n_img_piv + n_txt_piv))
    img_norm = flat[start:start + length].abs().sum(-1)
    txt_norm = flat[start + length:].abs().sum(-1)
    image_idx = (img_norm.topk(n_img_piv).indices + start).tolist()
    query_idx = (txt_norm.topk(n_txt_piv).indices + start + length).tolist()
    result = set(image_idx + query_idx)
    valid = set(range(start, start + length)) - set(image_idx)
    for item in list(result):
        candidates = list(valid)
        sim = -F.cosine_similarity(state[item], state[candidates], dim=-1)
        picked = [candidates[i] for i in sim.topk(topk_per_pivot).indices]
        result.update(picked)
        valid.difference_update(picked)
    result.difference_update(query_idx)
    return sorted(i - start for i in result)


@pytest.fixture
def random_final_norm(deep):
    """Tiny checkpoints keep the final norm's weights at 1 (no effect on cosines): randomise them."""
    changed = []

    def apply(vlm):
        norm = vlm.language_model.norm
        old = norm.weight.detach().clone()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(old.shape, generator=torch.Generator().manual_seed(3)) * 3 + 0.05)
        changed.append((norm, old))
    yield apply
    for norm, old in changed:
        with torch.no_grad():
            norm.weight.copy_(old)


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl", "llava"])
@pytest.mark.parametrize("reduction", [0.778, 0.5])
def test_dart_equals_the_authors_rule(deep, random_final_norm, fam, reduction):
    vlm, _ = deep(fam)
    random_final_norm(vlm)
    p = vlm.prepare(images=random_image(11, (224, 224)), question=QUESTION)
    ratio = 1 - reduction
    keep = DART().keep(vlm, p, ratio)
    expected = authors_dart(vlm, p, 2, reduction)
    assert keep.tolist() == expected
    assert len(keep) == dart_budget(p.num_visual, ratio, 4, 4) == 4 + 8 * int(p.num_visual * ratio / 8 + 1e-9)


def test_dart_options_change_the_kept_set(deep, random_final_norm):
    """keys before RoPE / pivots by norm / the exact budget are options; on these inputs each changes the set."""
    vlm, _ = deep("qwen2_vl")
    random_final_norm(vlm)
    p = vlm.prepare(images=random_image(11, (224, 224)), question=QUESTION)
    base = DART().keep(vlm, p, 0.25).tolist()
    exact = DART(budget="exact")
    assert exact.tokens_per_layer(p.num_visual, 0.25, 4)[-1] == len(exact.keep(vlm, p, 0.25)) == 16
    assert len(base) == 4 + 8 * 2 == 20
    assert DART(keys="raw").keep(vlm, p, 0.25).tolist() != base


def test_visiting_order_is_pythons_set_order():
    assert visiting_order([40, 3], [70, 35], "norm") == [0, 1, 2, 3]
    order = visiting_order([40, 3], [70, 35], "authors")
    assert [([40, 3] + [70, 35])[i] for i in order] == list(set([40, 3] + [70, 35])) != [40, 3, 70, 35]
