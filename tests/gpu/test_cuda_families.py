"""Every family on the device, images and video (``make test-gpu``; ``EXPLAINPRUNE_TEST_DEVICE=cpu`` dry-runs it):
keep-all generation equal to the model's own ``generate`` on the device, the device equal to the CPU (prompt,
positions, pruned generation, relevance), bfloat16 runs, and the family-specific seams that moved between
transformers releases (Qwen3-VL DeepStack rows, LLaVA-OneVision's video newline row, Qwen2.5-VL's temporal
positions at a fractional ``second_per_grid_ts``). Each of these failed or went silently wrong on
transformers 5.17, which a GPU test over four families and images only did not see."""

from __future__ import annotations

import os

import pytest
import torch

import explainprune
from explainprune.models.base import Video
from explainprune.relevance import relevance
from explainprune.testing import FAMILIES, random_image

DEVICE = torch.device(os.environ.get("EXPLAINPRUNE_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]
ANSWER = [5, 6, 7]


def load(path, device=DEVICE, dtype=torch.float32):
    return explainprune.load(path, dtype=dtype, device=device)


def media(kind: str) -> dict:
    if kind == "image":
        return {"images": random_image(0)}
    return {"video": Video([random_image(10 + i, (112, 112)) for i in range(4)], fps=4.0)}


def own_generate(vlm, p, n=6):
    with torch.no_grad():
        inputs = {k: v.to(vlm.device) if torch.is_tensor(v) else v for k, v in p.model_inputs.items()}
        ref = vlm.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=vlm.pad_token_id,
                                 eos_token_id=vlm.eos_token_ids)
    return ref[0, p.length:].tolist()


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_device(deep_dirs, family, kind):
    cpu, dev = load(deep_dirs(family), "cpu"), load(deep_dirs(family))
    q = "in frame 2 what digit is in row 1 column 2 ?" if kind == "video" else "what digit is in row 1 column 2 ?"
    p_cpu, p_dev = cpu.prepare(question=q, **media(kind)), dev.prepare(question=q, **media(kind))
    assert torch.equal(p_dev.input_ids.cpu(), p_cpu.input_ids) and torch.equal(p_dev.position_ids.cpu(),
                                                                               p_cpu.position_ids)
    # keep-all: the model's own generate, on the device
    out = dev.generate(p_dev, max_new_tokens=6)
    ref = own_generate(dev, p_dev)
    assert out.token_ids == ref[: len(out.token_ids)] and out.visual_tokens == p_dev.num_visual
    assert out.token_ids == cpu.generate(p_cpu, max_new_tokens=6).token_ids
    # pruned before the LLM (any device keep) and inside it: same kept tokens and logits as on the CPU
    uniform = explainprune.get_pruner("uniform")
    keep = uniform.keep(dev, p_dev, 0.25)
    assert torch.equal(keep, uniform.keep(cpu, p_cpu, 0.25))
    got = dev.generate(p_dev, keep=keep, max_new_tokens=3, output_logits=True)
    want = cpu.generate(p_cpu, keep=keep, max_new_tokens=3, output_logits=True)
    torch.testing.assert_close(got.logits[0].float().cpu(), want.logits[0].float(), atol=1e-3, rtol=1e-3)
    fastv = explainprune.get_pruner("fastv", layer=2)
    got = fastv.generate(dev, p_dev, 0.25, max_new_tokens=3, output_logits=True)
    want = fastv.generate(cpu, p_cpu, 0.25, max_new_tokens=3, output_logits=True)
    assert len(got.keep) == len(want.keep) == -(-p_cpu.num_visual // 4)
    if torch.equal(got.keep, want.keep):  # ties in attention may break differently on another device
        torch.testing.assert_close(got.logits[0].float().cpu(), want.logits[0].float(), atol=1e-3, rtol=1e-3)
    # relevance (Eq. 1) on the device equals the CPU's
    torch.testing.assert_close(relevance(dev, p_dev, answer=ANSWER).scores,
                               relevance(cpu, p_cpu, answer=ANSWER).scores, atol=1e-6, rtol=1e-3)
    # bfloat16: pruned generation and relevance run and give finite numbers
    bf = load(deep_dirs(family), dtype=torch.bfloat16)
    p_bf = bf.prepare(question=q, **media(kind))
    res = explainprune.get_pruner("uniform").generate(bf, p_bf, 0.25, max_new_tokens=3, output_logits=True)
    assert torch.isfinite(res.logits[0].float()).all() and res.visual_tokens == -(-p_bf.num_visual // 4)
    assert torch.isfinite(relevance(bf, p_bf, answer=ANSWER).scores).all()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_deepstack_rows_on_device(deep_dirs, family):
    """DeepStack: one [N_v, D] row block per level, on the device, and applied at the kept rows only."""
    dev = load(deep_dirs(family))
    p = dev.prepare(images=random_image(0), question="what digit is in row 1 column 2 ?")
    levels = len(dev.config.vision_config.deepstack_visual_indexes)
    assert len(p.visual_residuals) == levels > 0
    for rows in p.visual_residuals.values():
        assert rows.shape == (p.num_visual, dev.text_config.hidden_size) and rows.device.type == DEVICE.type
    keep = torch.arange(0, p.num_visual, 2)
    with torch.no_grad():
        full = dev.forward(p.inputs_embeds, p.position_ids.to(dev.device), p.attention_mask.to(dev.device),
                           prompt=p).logits
    assert torch.isfinite(full).all()
    assert dev.generate(p, keep=keep, max_new_tokens=3).visual_tokens == len(keep)


def test_llava_onevision_video_has_its_newline_row(deep_dirs):
    """The prompt's visual block is exactly what the model's own video features fill (the pooled frames plus
    the trailing newline row); keep-all on the device equals the model's own generate (5.17 lacked the row)."""
    dev = load(deep_dirs("llava_onevision"))
    p = dev.prepare(question="in frame 2 what digit is in row 1 column 2 ?", **media("video"))
    video_id = dev.config.video_token_index
    assert int((p.input_ids == video_id).sum()) == p.num_visual
    assert int((p.visual_grid[:, 1] < 0).sum()) >= 1  # the newline token(s): off the frame grid
    assert dev.generate(p, max_new_tokens=4).token_ids == own_generate(dev, p, 4)[:4]


def test_qwen2_5_vl_video_positions_follow_the_fps(deep_dirs):
    """At fps 4, second_per_grid_ts = 0.5: the temporal M-RoPE index still grows frame to frame (5.17's
    int() made every frame the same), and equals the model's own get_rope_index on the device."""
    dev = load(deep_dirs("qwen2_5_vl"))
    p = dev.prepare(question="in frame 2 what digit is in row 1 column 2 ?", **media("video"))
    t = p.position_ids[0, 0, p.visual_pos]
    frames = p.visual_grid[:, 0]
    per_frame = [int(t[frames == f].min()) for f in frames.unique().tolist()]
    assert len(per_frame) >= 2 and all(b > a for a, b in zip(per_frame, per_frame[1:])), per_frame
    inputs = {k: v.to(dev.device) if torch.is_tensor(v) else v for k, v in p.model_inputs.items()}
    rope = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
    types = (inputs["input_ids"] == dev.config.video_token_id).long() * 2
    own, _ = dev.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=types,
                                             attention_mask=inputs["attention_mask"], **rope)
    assert torch.equal(own.cpu(), p.position_ids.cpu())
