"""Adapters: loading, the Prompt they build, and keep-all generation equal to the model's own."""

from __future__ import annotations

import json

import pytest
import torch

import explainprune
from explainprune.models import adapter_for, supported_model_types

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "llava")


def test_load_picks_adapter_by_model_type(vlm, family):
    assert family in vlm.model_types
    assert vlm.config.model_type == family


def test_prompt_indexes_visual_tokens_and_instruction(vlm, image):
    question = "what digit is in row 2 column 3 ?"
    p = vlm.prepare(images=image, question=question)
    assert p.inputs_embeds.shape[:2] == p.input_ids.shape
    assert p.num_visual > 0 and p.visual_grid.shape == (p.num_visual, 3)
    # visual positions are exactly the placeholder tokens, one contiguous block for one image
    assert torch.equal(p.visual_pos, torch.arange(int(p.visual_pos[0]), int(p.visual_pos[-1]) + 1))
    start, end = p.instruction
    assert start > int(p.visual_pos[-1])
    assert vlm.tokenizer.decode(p.input_ids[0, start:end]).replace(" ", "") == question.replace(" ", "")
    # every on-grid (frame, row, column) is distinct
    on = p.visual_grid[p.visual_grid[:, 1] >= 0]
    assert len({tuple(x) for x in on.tolist()}) == len(on)


def test_keep_all_prefill_logits_equal_model_forward(vlm, image):
    p = vlm.prepare(images=image, question="what digit is in row 1 column 1 ?")
    with torch.no_grad():
        ref = vlm.model(**p.model_inputs).logits
        ours = vlm.forward(p.inputs_embeds, p.position_ids, p.attention_mask, prompt=p).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("media", ["image", "video"])
def test_keep_all_generation_equals_model_generate(vlm, family, image, frames, media):
    if media == "video" and family not in VIDEO_FAMILIES:
        pytest.skip(f"{family} has no video input")
    kwargs = {"images": image} if media == "image" else {"video": frames}
    p = vlm.prepare(question="how many 3 are there ?", **kwargs)
    with torch.no_grad():
        ref = vlm.model.generate(**p.model_inputs, max_new_tokens=8, do_sample=False,
                                 pad_token_id=vlm.pad_token_id, eos_token_id=vlm.eos_token_ids)
    ref_new = ref[0, p.length:].tolist()
    out = vlm.generate(p, max_new_tokens=8)
    assert out.token_ids == ref_new[: len(out.token_ids)]
    assert len(out.token_ids) == len(ref_new) or out.token_ids[-1] in vlm.eos_token_ids
    assert out.visual_tokens == p.num_visual


def test_video_grid_spans_frames(vlm, frames):
    p = vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?")
    f, r, c = p.grid_shape
    assert f >= 2 and r >= 1 and c >= 1
    assert p.num_visual >= f * r * c


def test_load_rejects_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model type 'bert'.*qwen2_vl"):
        explainprune.load(tmp_path)
    with pytest.raises(ValueError, match="llava_onevision"):
        adapter_for("gpt2")


def test_load_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        explainprune.load(tmp_path / "nope")


def test_supported_types_cover_the_families():
    assert set(supported_model_types()) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision",
                                            "llava"}


def test_fingerprint_describes_the_text_model(vlm):
    fp = vlm.fingerprint()
    assert fp["model_type"] == vlm.config.model_type
    assert fp["num_hidden_layers"] == vlm.text_config.num_hidden_layers


def test_prepare_refuses_a_misspelt_keyword_instead_of_dropping_the_image(vlm, image):
    """``prepare(image=...)`` (singular) used to be swallowed by ``**kwargs``: a text-only prompt, no error."""
    with pytest.raises(TypeError, match="image"):
        vlm.prepare(image=image, question="what digit ?")
    assert vlm.prepare(images=image, question="what digit ?", fps=2.0).num_visual > 0
