"""PyramidDrop against a literal reading of its authors' rule (``pdrop_rank_drop`` and ``pdrop_forward`` in
``llava/model/modeling_llama_pdrop.py`` of Cooperx521/PyramidDrop), written here from their logic:

after decoder layer K-1 (K in ``layer_list``), the boundary layer K's input norm / q / k run on the hidden
states; the LAST prompt token's softmax row (causal mask, scaled by 1/sqrt(hd), mean over heads) is read at
the image columns; the top int(N * ratio_list[s]) stay (sorted), the rest of the image is cut out of the
sequence, and every later layer (and every decode step) numbers the shorter sequence 0..L'-1.
The reference re-runs the whole sequence each step with no cache (the prefill's choice reused)."""

from __future__ import annotations

import math

import pytest
import torch

import explainprune
from explainprune.pruning.pdrop import PyramidDrop
from explainprune.testing import random_image

QUESTION = "what digit is in row 2 column 3 ?"


def rotate(x, cos, sin):
    """RoPE on x [B, H, L, hd] with cos/sin [B, L, hd]: x cos + (-x2, x1) sin (the two halves swapped)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + swapped * sin[:, None]


def causal(n):
    return torch.zeros(1, 1, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))


@torch.no_grad()
def authors_reference(vlm, prompt, layer_list, ratio_list, steps):
    """(kept original image indices after each boundary, logits [steps, vocab]) of the authors' PyramidDrop."""
    lm, head = vlm.language_model, vlm.model.lm_head
    n_img, start = prompt.num_visual, int(prompt.visual_pos[0])
    assert prompt.visual_pos.tolist() == list(range(start, start + n_img))  # one contiguous image (LLaVA)
    ratios = [1.0] + list(ratio_list)
    seq = prompt.inputs_embeds
    chosen: dict[int, torch.Tensor] = {}  # boundary -> rows kept among the image block entering it
    logits = []
    for step in range(steps):
        h, ids, length = seq, torch.arange(n_img), n_img
        for i, layer in enumerate(lm.layers):
            n = h.shape[1]
            rope = lm.rotary_emb(h, torch.arange(n)[None])
            h = layer(h, attention_mask=causal(n), position_embeddings=rope)
            if i + 1 in layer_list:
                s = layer_list.index(i + 1)
                keep = int(n_img * ratios[s + 1])
                if step == 0:
                    nxt = lm.layers[i + 1]
                    x = nxt.input_layernorm(h)
                    att = nxt.self_attn
                    hd = att.head_dim
                    q = att.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
                    k = att.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
                    cos, sin = lm.rotary_emb(h, torch.arange(n)[None])
                    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                    last = n - 1  # the last prompt token (prompt_len + image tokens - 1)
                    w = (q[:, :, last:last + 1] @ k.transpose(-1, -2)) / math.sqrt(hd) + causal(n)[:, :, last:last + 1]
                    w = torch.softmax(w.float(), -1).mean(1)[0, 0]          # mean over heads: [n]
                    chosen[i + 1] = torch.sort(w[start:start + length].topk(keep).indices).values
                rows = chosen[i + 1]
                h = torch.cat([h[:, :start], h[:, start + rows], h[:, start + length:]], 1)
                ids, length = ids[rows], keep
                if step == 0:
                    chosen[("ids", i + 1)] = ids.clone()
        out = head(lm.norm(h))[0, -1]
        logits.append(out)
        seq = torch.cat([seq, vlm.model.get_input_embeddings()(out.argmax().view(1, 1))], 1)
    return [chosen[("ids", k)] for k in layer_list], torch.stack(logits)


def test_pdrop_equals_the_authors_rule_on_llava(deep):
    """The default (compact positions, int() counts) equals the authors' rule: every stage's kept set and
    the logits; with original positions (this implementation's option) the later stages / logits differ."""
    vlm, _ = deep("llava")
    p = vlm.prepare(images=random_image(7), question=QUESTION)
    # the authors' own setting at their average retention: λ = 0.5 at L/4, L/2, 3L/4 (1, 2, 3 of 4 layers)
    pd = PyramidDrop()
    out = pd.generate(vlm, p, 0.46875, max_new_tokens=4, output_logits=True)
    kept, ref = authors_reference(vlm, p, [1, 2, 3], [0.5, 0.25, 0.125], len(out.token_ids))
    assert out.visual_per_layer == [p.num_visual] + [len(k) for k in kept]
    assert out.visual_per_layer == pd.tokens_per_layer(p.num_visual, 0.46875, 4)
    assert out.keep.tolist() == sorted(kept[-1].tolist())
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert PyramidDrop(lam=0.5).plan(4, 0.2) == ((1, 2, 3), 0.5)  # the authors' literal command line
    original = PyramidDrop(positions="original").generate(vlm, p, 0.46875, max_new_tokens=4, output_logits=True)
    assert (original.logits - out.logits).abs().max() > 1e-3


def test_pdrop_compact_ragged_batch_equals_one_by_one(deep):
    vlm, _ = deep("llava_onevision")
    prompts = [vlm.prepare(images=random_image(8), question=QUESTION),
               vlm.prepare(images=random_image(9, (56, 84)), question="how many 7 are there ?")]
    pd = PyramidDrop()
    batch = pd.generate(vlm, prompts, 0.3, max_new_tokens=3, output_logits=True)
    for p, b in zip(prompts, batch):
        alone = pd.generate(vlm, p, 0.3, max_new_tokens=3, output_logits=True)
        assert b.keep.tolist() == alone.keep.tolist() and b.token_ids == alone.token_ids
        torch.testing.assert_close(b.logits, alone.logits, atol=1e-4, rtol=0)


def test_pdrop_mrope_families_keep_original_positions(deep):
    """The authors' code is LLaVA-only; on M-RoPE families positions stay original (compact not defined)."""
    vlm, _ = deep("qwen2_vl")
    p = vlm.prepare(images=random_image(7), question=QUESTION)
    a = PyramidDrop().generate(vlm, p, 0.4, max_new_tokens=2, output_logits=True)
    b = PyramidDrop(positions="original").generate(vlm, p, 0.4, max_new_tokens=2, output_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="M-RoPE"):
        from explainprune.pruning.inllm import generate_inllm
        generate_inllm(vlm, p, PyramidDrop().stages(vlm, 0.4), 1, positions="compact")


def test_tokens_per_layer_equals_the_runner(deep):
    """``tokens_per_layer`` (no model) equals what a real run reports, for the in-LLM methods."""
    vlm, _ = deep("qwen2_vl")
    p = vlm.prepare(images=random_image(1), question=QUESTION)
    for name, options, ratio in [("pdrop", {}, 0.3), ("pdrop", {"budget": "exact"}, 0.7),
                                 ("dart", {}, 0.4), ("dart", {"budget": "exact"}, 0.4), ("fastv", {}, 0.35),
                                 ("fastv", {"layer": 3}, 0.5)]:
        pruner = explainprune.get_pruner(name, **options)
        out = pruner.generate(vlm, p, ratio, max_new_tokens=1)
        assert out.visual_per_layer == pruner.tokens_per_layer(p.num_visual, ratio, 4), (name, options)
