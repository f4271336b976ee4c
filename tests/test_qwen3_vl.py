"""Qwen3-VL specifics: video timestamps as the processor writes them, DeepStack rows follow pruning."""

from __future__ import annotations

import pytest
import torch

from explainprune import get_pruner
from explainprune.models.qwen3_vl import frame_timestamps


def test_frame_timestamps_match_the_processor_rule():
    # Qwen3VLProcessor._calculate_timestamps: pad to the temporal patch with the last index, mean of each pair
    assert frame_timestamps([0.0, 0.5, 1.0, 1.5], 2) == [0.25, 1.25]
    assert frame_timestamps([0.0, 1.0, 2.0], 2) == [0.5, 2.0]


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_video_prompt_carries_a_timestamp_per_frame(vlm, frames):
    p = vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?", fps=2.0)
    text = vlm.tokenizer.decode(p.input_ids[0])
    per_frame = p.num_visual // 2  # 4 raw frames -> 2 temporal tokens
    assert text.count("seconds") == 2 and text.count("<|video_pad|>") == 2 * per_frame
    # frames 0,1 at 2 fps -> 0.25 s, frames 2,3 -> 1.25 s (rendered with one decimal: "0.2", "1.2")
    assert "0. 2 seconds" in text and "1. 2 seconds" in text
    # the visual blocks are interleaved with text, and each frame keeps its own grid frame index
    gaps = torch.diff(p.visual_pos)
    assert int((gaps > 1).sum()) == 1 and set(p.visual_grid[:, 0].tolist()) == {0, 1}
    clip = type("Clip", (list,), {})(frames)
    clip.timestamps = [0.0, 10.0, 20.0, 30.0]
    q = vlm.prepare(video=clip, question="in frame 1 what digit is in row 1 column 1 ?")
    assert "5. 0 seconds" in vlm.tokenizer.decode(q.input_ids[0])
    assert not torch.equal(p.input_ids, q.input_ids)  # time is text in Qwen3-VL, not a position offset


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_deepstack_rows_follow_the_kept_tokens(vlm, image):
    p = vlm.prepare(images=image, question="what digit is in row 2 column 3 ?")
    assert sorted(p.visual_residuals) == [0, 1]
    assert all(t.shape == (p.num_visual, p.inputs_embeds.shape[-1]) for t in p.visual_residuals.values())
    keep = get_pruner("random", seed=0).keep(vlm, p, 0.5)
    with_ds = vlm.generate(p, keep=keep, max_new_tokens=4, output_logits=True)
    p.visual_residuals = {}  # the same prompt without DeepStack gives other logits: the rows are used
    without = vlm.generate(p, keep=keep, max_new_tokens=4, output_logits=True)
    assert not torch.allclose(with_ds.logits, without.logits)
    assert vlm.active_residuals is None  # hooks gone after generate
    assert not any(m._forward_hooks for m in vlm.language_model.layers)
