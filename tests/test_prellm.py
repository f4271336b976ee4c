"""The pre-LLM baselines: DivPrune, VisionZip, layer0, seeded random (device/dtype independent) and the
oracle's head-mean ablation, each on hand-made inputs whose correct selection is known."""

from __future__ import annotations

import math

import pytest
import torch

import explainprune
from explainprune import get_pruner, select
from explainprune.attention import first_layer_attention
from explainprune.evaluation import METHODS
from explainprune.evaluation.runner import EvalConfig, build_pruners
from explainprune.models.base import pad_left
from explainprune.pruning import available
from explainprune.pruning.divprune import max_min_order
from explainprune.pruning.visionzip import ZipPlan, merged_prompt, vision_scores, visionzip_plan
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


def circle(*degrees: float) -> torch.Tensor:
    a = torch.tensor(degrees) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_max_min_order_hand_made():
    # 180° is farthest from its nearest neighbour (91°); then 0° (opposite), then 90°
    feats = circle(0, 1, 90, 180, 91)
    assert max_min_order(feats)[:3].tolist() == [3, 0, 2]
    assert sorted(max_min_order(feats).tolist()) == [0, 1, 2, 3, 4]
    # duplicates are never picked twice, even when every remaining distance is 0
    assert sorted(max_min_order(circle(0, 0, 0)).tolist()) == [0, 1, 2]


def test_divprune_keeps_a_greedy_prefix(load_tiny, family):
    vlm = load_tiny(family)
    p = vlm.prepare(images=random_image(0), question=QUESTION)
    order = max_min_order(p.inputs_embeds[0, p.visual_pos])
    for ratio in (0.5, 0.1):
        keep = get_pruner("divprune").keep(vlm, p, ratio)
        assert keep.tolist() == sorted(order[: len(keep)].tolist()) and len(keep) == math.ceil(ratio * p.num_visual)


def test_visionzip_plan_hand_made():
    attention = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.7, 0.0])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([e1, e1, e1, e2, e1, e2, e1, e1 + 0.1 * e2])
    plan = visionzip_plan(attention, keys, kept=5, contextual=2)
    # dominant: top 3 attention {0, 2, 6}; remaining [1, 3, 4, 5, 7], step 5 // 2 = 2 -> targets 1 and 4
    assert plan.keep.tolist() == [0, 1, 2, 4, 6]
    # 3 and 5 (keys e2) are orthogonal to both targets' e1 keys: argmax ties go to the first target;
    # 7 (e1 + .1 e2) is closest to the e1 targets too
    assert plan.groups[1].tolist() == [1, 3, 5, 7] and plan.groups[4].tolist() == [4]
    keys2 = torch.stack([e1, e1, e1, e2, e2, e2, e1, e2])  # target 4 has an e2 key: 3, 5, 7 join it
    plan2 = visionzip_plan(attention, keys2, kept=5, contextual=2)
    assert plan2.groups[1].tolist() == [1] and plan2.groups[4].tolist() == [4, 3, 5, 7]
    assert visionzip_plan(attention, keys, kept=1, contextual=1).keep.tolist() == [0]  # no room for merging


def test_visionzip_merged_token_position(load_tiny):
    """A merged token sits in its target's slot with the target's ORIGINAL position id (M-RoPE (t, h, w))."""
    vlm = load_tiny("qwen2_vl")
    p = vlm.prepare(images=random_image(1), question=QUESTION)
    plan = ZipPlan(keep=torch.tensor([0, 5, 9]), groups={5: torch.tensor([5, 1, 2, 12])})
    merged = merged_prompt(p, plan)
    embeds, mask, pos = pad_left([merged], [plan.keep])
    rows = p.kept_positions(plan.keep)
    slot = int(torch.nonzero(rows == p.visual_pos[5]))
    torch.testing.assert_close(embeds[0, slot], p.inputs_embeds[0, p.visual_pos[[5, 1, 2, 12]]].mean(0))
    assert pos[:, 0, slot].tolist() == p.position_ids[:, 0, p.visual_pos[5]].tolist()
    others = [i for i in range(len(rows)) if i != slot]
    torch.testing.assert_close(embeds[0, others], p.inputs_embeds[0, rows[others]])
    assert torch.equal(p.inputs_embeds, vlm.prepare(images=random_image(1), question=QUESTION).inputs_embeds)
    out = get_pruner("visionzip").generate(vlm, p, 0.25, max_new_tokens=3, output_logits=True)
    zplan = get_pruner("visionzip").plan(vlm, p, 0.25)
    ref = vlm.generate(merged_prompt(p, zplan), keep=zplan.keep, max_new_tokens=3, output_logits=True)
    assert out.token_ids == ref.token_ids and out.visual_tokens == math.ceil(0.25 * p.num_visual)


@pytest.mark.parametrize("fam,size", [("qwen2_vl", (112, 112)), ("qwen2_5_vl", (112, 112)),
                                      ("qwen2_5_vl", (168, 168))])
def test_visionzip_scores_follow_llm_token_order(load_tiny, fam, size):
    """The encoder scores are per LLM token: Qwen2.5-VL's window order is undone. Checked by the attention
    each image receives (its softmax rows sum to one per image: the per-token means sum to 1/4) and by
    the keys, whose order must match the merger's output order. At 6x6 LLM tokens (168 px) the window
    permutation is not its own inverse (at 4x4 it is, so applying it instead of its inverse passes there)."""
    vlm = load_tiny(fam)
    p = vlm.prepare(images=[random_image(2, size), random_image(3, (56, 112))], question=QUESTION)
    scores, keys = vision_scores(vlm, p)
    assert scores.shape == (p.num_visual,) and keys.shape[0] == p.num_visual
    first = int((p.visual_grid[:, 0] == 0).sum())
    assert scores[:first].sum().item() == pytest.approx(0.25, abs=1e-5)
    assert scores[first:].sum().item() == pytest.approx(0.25, abs=1e-5)
    visual = vlm.model.model.visual
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def grab_out(module, args, output):
        seen["out"] = output.detach()

    h = visual.blocks[-1].attn.register_forward_pre_hook(grab, with_kwargs=True)
    h2 = visual.blocks[-1].register_forward_hook(grab_out)
    try:
        with torch.no_grad():
            vlm.model.model.get_image_features(p.model_inputs["pixel_values"], p.model_inputs["image_grid_thw"])
    finally:
        h.remove()
        h2.remove()
    attn = visual.blocks[-1].attn
    with torch.no_grad():
        k = attn.qkv(seen["h"]).reshape(len(seen["h"]), 3, attn.num_heads, -1)[:, 1].float().mean(1)
    block_keys = k.view(-1, 4, k.shape[-1]).mean(1)  # in the blocks' order
    # every LLM token's key is one of the block-order keys, and for Qwen2.5-VL at a permuted place
    match = (keys[:, None, :] - block_keys[None]).abs().sum(-1).argmin(1)
    assert sorted(match.tolist()) == list(range(p.num_visual))
    # ... and it is the right place: the merger's output at that block position is the token's feature
    with torch.no_grad():
        merged = visual.merger(seen["out"])
    torch.testing.assert_close(merged[match], p.inputs_embeds[0, p.visual_pos], atol=1e-5, rtol=1e-4)
    identity = list(range(p.num_visual))
    assert (match.tolist() != identity) if fam == "qwen2_5_vl" else (match.tolist() == identity)
    if size == (168, 168):
        assert match[match].tolist() != identity  # not an involution
    assert get_pruner("visionzip").keep(vlm, p, 0.5).tolist() == visionzip_plan(  # (no CLS on Qwen)
        scores, keys, math.ceil(0.5 * p.num_visual), round(math.ceil(0.5 * p.num_visual) * 10 / 64)).keep.tolist()


def test_visionzip_llava_cls_and_unsupported_family(load_tiny):
    vlm = load_tiny("llava")
    p = vlm.prepare(images=random_image(4), question=QUESTION)
    scores, _ = vision_scores(vlm, p)
    assert scores.shape == (p.num_visual,)
    assert 0 < scores.sum().item() <= vlm.config.vision_config.num_attention_heads + 1e-4  # CLS row, summed over heads
    ov = load_tiny("llava_onevision")
    q = ov.prepare(images=random_image(4), question=QUESTION)
    with pytest.raises(ValueError, match="does not support the 'llava_onevision' family"):
        get_pruner("visionzip").keep(ov, q, 0.5)
    q3 = load_tiny("qwen3_vl")
    with pytest.raises(ValueError, match="does not support the 'qwen3_vl' family"):
        get_pruner("visionzip").keep(q3, q3.prepare(images=random_image(4), question=QUESTION), 0.5)


def test_layer0_ranks_by_head_mean_of_first_layer_attention(load_tiny, family):
    vlm = load_tiny(family)
    p = vlm.prepare(images=random_image(5), question=QUESTION)
    a = first_layer_attention(vlm, p)
    torch.testing.assert_close(get_pruner("layer0").score(vlm, p), a.mean(0))
    assert get_pruner("layer0").keep(vlm, p, 0.25).tolist() == select(a.mean(0), 0.25).tolist()


def test_random_same_on_fp32_and_bf16(tiny_dirs):
    path = tiny_dirs("qwen2_vl")
    fp32, bf16 = explainprune.load(path), explainprune.load(path, dtype=torch.bfloat16)
    for seed in (0, 3):
        a = fp32.prepare(images=random_image(6), question=QUESTION)
        b = bf16.prepare(images=random_image(6), question=QUESTION)
        assert a.inputs_embeds.dtype == torch.float32 and b.inputs_embeds.dtype == torch.bfloat16
        assert torch.equal(get_pruner("random", seed=seed).keep(fp32, a, 0.25),
                           get_pruner("random", seed=seed).keep(bf16, b, 0.25))


def test_oracle_mean_rule_reachable_from_eval_specs():
    pruners = dict(build_pruners(EvalConfig(methods=("oracle:rule=mean", "oracle"))))
    assert pruners["oracle:rule=mean"].rule == "mean" and pruners["oracle"].rule == "grad"


def test_eval_help_lists_every_registered_method():
    assert set(METHODS) == set(available(plugins=False))  # the built-ins; plug-ins are listed from metadata
    from explainprune.cli.main import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    text = " ".join(sub.format_help().split())
    for name in available():
        assert name in text


@pytest.mark.parametrize("name", ["divprune", "visionzip", "layer0", "random"])
def test_pre_llm_ragged_batch_equals_one_by_one(load_tiny, frames, name):
    vlm = load_tiny("qwen2_vl")
    prompts = [vlm.prepare(images=random_image(7, (56, 84)), question=QUESTION),
               vlm.prepare(video=frames, question="in frame 2 what digit is in row 1 column 2 ?")]
    assert prompts[0].length != prompts[1].length
    pruner = get_pruner(name)
    batch = pruner.generate(vlm, prompts, 0.25, max_new_tokens=4, output_logits=True)
    for p, b in zip(prompts, batch):
        alone = pruner.generate(vlm, p, 0.25, max_new_tokens=4, output_logits=True)
        assert b.token_ids == alone.token_ids and b.visual_tokens == alone.visual_tokens
        torch.testing.assert_close(b.logits, alone.logits, atol=1e-4, rtol=0)
