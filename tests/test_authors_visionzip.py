"""VisionZip against a literal reading of its authors' rule (``CLIPVisionTower_VisionZip.forward`` in
``visionzip/clip_encoder.py`` and ``visionzip()`` in ``visionzip/main.py`` of dvlab-research/VisionZip),
written here from their logic, and its dominance score against the vision block's own eager attention.

Authors (LLaVA / CLIP): ``visionzip(model, dominant, contextual)`` asks the tower for ``dominant - 1``
patches; the CLS row of layer -2's attention (its ``output_attentions``), summed over heads, ranks the
patches (columns 1:); CLS + the top patches are dominant; the other patches, in order, are the candidates;
their keys (layer -2's k_proj, mean over heads), L2-normalised, give every step-th candidate
(step = max(1, M // contextual), first ``contextual``) as a contextual target."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from explainprune.pruning.visionzip import VisionZip, vision_scores
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


@pytest.fixture
def peaked():
    """Scale a block's query / key weights so its attention is far from uniform (restored afterwards)."""
    saved = []

    def apply(*weights, factor=4.0):
        for w in weights:
            saved.append((w, w.detach().clone()))
            with torch.no_grad():
                w.mul_(factor)
    yield apply
    for w, old in saved:
        with torch.no_grad():
            w.copy_(old)


@contextlib.contextmanager
def eager_tower(vlm):
    """The vision tower on eager attention for the reference (explainprune keeps it on sdpa: models/base.py)."""
    config = vlm.model.config.vision_config
    saved, config._attn_implementation = config._attn_implementation, "eager"
    try:
        yield
    finally:
        config._attn_implementation = saved


def encoder_of(vlm):
    tower = vlm.model.model.vision_tower
    return tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder


@torch.no_grad()
def authors_visionzip_llava(vlm, pixels, dominant: int, contextual: int) -> list[int]:
    """Kept patch indices (0-based, CLS excluded) of the authors' rule: ``dominant`` (CLS included) + ``contextual``."""
    tower = vlm.model.model.vision_tower
    with eager_tower(vlm):
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    attn = out.attentions[-2]                                               # [1, H, 1 + P, 1 + P]
    layer = encoder_of(vlm).layers[-2]
    x = layer.layer_norm1(out.hidden_states[-3])                            # the input of layer -2
    sa = layer.self_attn
    metric = sa.k_proj(x).view(1, x.shape[1], sa.num_heads, -1).mean(2)[0]  # [1 + P, hd]
    top = attn[0, :, 0, 1:].sum(0).topk(dominant - 1).indices + 1
    chosen = torch.zeros(x.shape[1], dtype=torch.bool)
    chosen[0] = True
    chosen[top] = True
    rest = torch.nonzero(~chosen).flatten()
    m = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    step = max(1, m.shape[0] // contextual)
    targets = rest[torch.arange(0, m.shape[0], step)[:contextual]]
    return sorted((torch.cat([top, targets]) - 1).tolist())


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_visionzip_equals_the_authors_rule_on_llava(deep, peaked, ratio):
    _, vlm = deep("llava")
    sa = encoder_of(vlm).layers[-2].self_attn
    peaked(sa.q_proj.weight, sa.k_proj.weight)
    p = vlm.prepare(images=random_image(5), question=QUESTION)
    kept = -(-int(ratio * p.num_visual * 1000) // 1000)
    contextual = round(kept * 10 / 64)
    expected = authors_visionzip_llava(vlm, p.model_inputs["pixel_values"], kept - contextual, contextual)
    got = VisionZip().plan(vlm, p, ratio)
    assert got.keep.tolist() == expected and len(expected) == kept - 1   # the CLS took one dominant slot
    assert len(VisionZip(cls_slot=False).plan(vlm, p, ratio).keep) == kept


def test_visionzip_cls_columns(deep, peaked):
    """The dominance score of patch j is the CLS row's column j + 1 of layer -2's eager attention, head-summed."""
    _, vlm = deep("llava")
    sa = encoder_of(vlm).layers[-2].self_attn
    peaked(sa.q_proj.weight, sa.k_proj.weight)
    p = vlm.prepare(images=random_image(6), question=QUESTION)
    with torch.no_grad(), eager_tower(vlm):
        out = vlm.model.model.vision_tower(p.model_inputs["pixel_values"], output_attentions=True)
    expected = out.attentions[-2][0, :, 0, 1:].sum(0)
    torch.testing.assert_close(vision_scores(vlm, p)[0], expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_visionzip_received_attention_equals_the_blocks_eager_attention(deep, peaked, monkeypatch, fam):
    """Qwen: the attention each patch RECEIVES in the last block (softmax over the keys, mean over heads and
    queries, per image), averaged over each merged group, equals the block's own eager attention weights."""
    _, vlm = deep(fam)
    visual = vlm.model.model.visual
    block = visual.blocks[-1]
    dim = block.attn.qkv.weight.shape[1]
    peaked(block.attn.qkv.weight[: 2 * dim])
    module = sys.modules[type(block.attn).__module__]
    original = module.eager_attention_forward
    flag, weights = {"on": False}, []

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        if flag["on"]:
            weights.append(w.detach())
        return out, w

    # 6x6 LLM tokens: Qwen2.5-VL's window permutation is not its own inverse there (it is at 4x4)
    p = vlm.prepare(images=[random_image(2, (168, 168)), random_image(3, (56, 112))], question=QUESTION)
    monkeypatch.setattr(module, "eager_attention_forward", recording)
    hooks = [block.attn.register_forward_pre_hook(lambda m, a: flag.__setitem__("on", True)),
             block.attn.register_forward_hook(lambda m, a, o: flag.__setitem__("on", False))]
    try:
        with torch.no_grad(), eager_tower(vlm):
            vlm.model.model.get_image_features(p.model_inputs["pixel_values"], p.model_inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    received = torch.cat([w[0].mean(0).mean(0) for w in weights])           # block order, per patch
    per_token = received.view(-1, 4).mean(1)
    if fam == "qwen2_5_vl":  # blocks run in window order: back to the LLM's token order
        window_index, _ = module.get_vision_window_index(
            p.model_inputs["image_grid_thw"], spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
        per_token = per_token[torch.argsort(window_index)]
    assert per_token.std() > 1e-3  # peaked: not uniform
    torch.testing.assert_close(vision_scores(vlm, p)[0], per_token.float(), atol=1e-5, rtol=1e-4)
