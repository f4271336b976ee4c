"""FastV and DivPrune against literal readings of their authors' rules, written here from their logic.

FastV (pkunlp-icler/FastV, ``src/FastV/llava-hf/transformers/.../modeling_llama.py``, ``LlamaModel.forward``):
layer K-1's output attention, mean over heads, the LAST row, the image columns; the top
round(N (1 - r)) image tokens stay from layer K on (r = the share dropped).
DivPrune (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``): D = 1 - pairwise cosine
similarity of the visual features; the first pick maximises the second-smallest entry of its column
(its nearest other token), then each pick maximises the column minimum over the rows already picked;
round(ratio N) picks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from explainprune.pruning.divprune import DivPrune
from explainprune.pruning.fastv import FastV
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


@torch.no_grad()
def authors_fastv(eager, prompt, k: int, drop: float) -> list[int]:
    seen = {}
    attn = eager.language_model.layers[k - 1].self_attn
    handle = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("w", out[1]))
    try:
        eager.forward(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask, prompt=prompt, use_cache=False)
    finally:
        handle.remove()
    start, n = int(prompt.visual_pos[0]), prompt.num_visual
    last_row = seen["w"].mean(1)[0][-1]
    top = last_row[start:start + n].topk(round(n * (1 - drop))).indices
    return sorted(top.tolist())


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("k,drop", [(2, 0.75), (1, 0.5), (3, 0.875)])
def test_fastv_equals_the_authors_rule(deep, fam, k, drop):
    vlm, eager = deep(fam)
    p = vlm.prepare(images=random_image(12, (224, 224)), question=QUESTION)
    assert p.visual_pos.tolist() == list(range(int(p.visual_pos[0]), int(p.visual_pos[0]) + p.num_visual))
    assert (1 - drop) * p.num_visual == round((1 - drop) * p.num_visual)  # ceil (ours) = round (authors) here
    assert FastV(layer=k).keep(vlm, p, 1 - drop).tolist() == authors_fastv(eager, p, k, drop)


def authors_divprune(features: torch.Tensor, ratio: float) -> list[int]:
    x = features.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(round(ratio * x.shape[0])):
        if i == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            score = dist[torch.tensor(picks)].min(0).values
        picks.append(int(torch.argmax(score)))
    return sorted(picks)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_divprune_equals_the_authors_rule_on_unequal_norms(load_tiny, ratio):
    """Row norms from 0.05 to 20: a distance without the L2 normalisation would pick otherwise."""
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(13, (224, 224)), question=QUESTION)
    order = torch.randperm(p.num_visual, generator=torch.Generator().manual_seed(0))
    scale = torch.logspace(-1.3, 1.3, p.num_visual)[order]
    embeds = p.inputs_embeds.clone()
    embeds[0, p.visual_pos] = embeds[0, p.visual_pos] * scale[:, None].to(embeds.dtype)
    q = dataclasses.replace(p, inputs_embeds=embeds)
    assert ratio * p.num_visual == round(ratio * p.num_visual)
    keep = DivPrune().keep(vlm, q, ratio).tolist()
    assert keep == authors_divprune(embeds[0, p.visual_pos], ratio)
