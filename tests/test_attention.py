"""First-layer attention A_v^0 (Section 3.3) and the reversible eager switch."""

from __future__ import annotations

import pytest
import torch

from explainprune.attention import eager_attention, first_layer_attention


def full_forward_reference(vlm, prompt) -> torch.Tensor:
    """Slice of output_attentions[0] of a full eager forward: instruction rows, visual columns, row mean."""
    with eager_attention(vlm), torch.no_grad():
        out = vlm.forward(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask,
                          output_attentions=True, use_cache=False)
    s, e = prompt.instruction
    return out.attentions[0][0, :, s:e][..., prompt.visual_pos].mean(1)


def test_first_layer_attention_equals_full_forward(vlm, image):
    prompt = vlm.prepare(images=image, question="what is in the picture")
    a = first_layer_attention(vlm, prompt)
    heads = vlm.text_config.num_attention_heads
    assert a.shape == (heads, prompt.num_visual) and a.dtype == torch.float32
    torch.testing.assert_close(a, full_forward_reference(vlm, prompt), atol=1e-6, rtol=0)
    assert vlm.language_model.config._attn_implementation == "sdpa"  # the model keeps sdpa


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_first_layer_attention_on_video(vlm, frames):
    prompt = vlm.prepare(video=frames, question="what happens")
    torch.testing.assert_close(first_layer_attention(vlm, prompt), full_forward_reference(vlm, prompt),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_first_layer_attention_runs_no_other_layer(vlm, image):
    prompt = vlm.prepare(images=image, question="what is in the picture")
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(i))
               for i, layer in enumerate(vlm.language_model.layers)]
    try:
        first_layer_attention(vlm, prompt)
    finally:
        for h in handles:
            h.remove()
    assert seen == [0]  # stopped at layer 0's input; layer 0's own forward never ran either


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_first_layer_attention_needs_an_instruction(vlm, image):
    prompt = vlm.prepare(images=image, question="")
    with pytest.raises(ValueError, match="instruction"):
        first_layer_attention(vlm, prompt)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_eager_switch_is_text_only_and_reversible(vlm):
    lm = vlm.language_model
    vision = vlm.model.config.vision_config
    before_vision = vision._attn_implementation
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(vlm):
            assert lm.config._attn_implementation == "eager"
            assert all(layer.self_attn.config._attn_implementation == "eager" for layer in lm.layers)
            assert vision._attn_implementation == before_vision
            raise RuntimeError("inside")
    assert lm.config._attn_implementation == "sdpa"
    assert vision._attn_implementation == before_vision
