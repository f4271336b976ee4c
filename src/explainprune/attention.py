"""Attention of the language model: the eager switch and the first-layer attention A_v^0 (Section 3.3).

``eager_attention`` makes the text decoder (only) return attention maps that stay in the autograd graph,
reversibly and per instance. ``first_layer_attention`` computes layer 0's instruction -> visual attention
from layer 0's own modules (input layernorm, q/k projections, the model's rotary embedding and
``apply_rotary_pos_emb``, causal softmax), without running the rest of the LLM. ``apply_rope`` is the
one place RoPE is applied outside the model's forward (here and in FastV's scores).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt


def _text_configs(vlm: VLM) -> list[Any]:
    """Distinct config objects the text decoder and its attention layers read the implementation from."""
    lm = vlm.language_model
    configs = [lm.config] + [layer.self_attn.config for layer in lm.layers]
    unique: dict[int, Any] = {}
    for c in configs:
        unique.setdefault(id(c), c)
    return list(unique.values())


@contextmanager
def eager_attention(vlm: VLM) -> Iterator[None]:
    """Inside the block the language model uses eager attention (maps returned and differentiable).

    Only the text decoder's config changes (its causal masks follow it, so attention stays causal); the
    vision tower keeps its implementation. The previous setting is restored on exit, exception or not.
    """
    configs = _text_configs(vlm)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


class _Stop(Exception):
    """Raised by a hook to end a forward early once what it needs is captured."""


@contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    """Remove the given hook handles on exit, exception or not."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_inputs(vlm: VLM, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor,
                 layer: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) the model passes to decoder layer ``layer``; stops the forward right there.

    args[0] is the hidden state [1, L, D]; kwargs hold what the model computed for the layer (mask,
    ``position_embeddings`` = the rotary (cos, sin), position ids). Nothing after the capture runs.
    """
    captured: dict[str, Any] = {}

    def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    target = vlm.language_model.layers[layer]
    with hooks(target.register_forward_pre_hook(grab, with_kwargs=True)), torch.no_grad():
        try:
            vlm.forward(embeds, position_ids, attention_mask, use_cache=False)
        except _Stop:
            pass
    if "args" not in captured:  # pragma: no cover - defensive
        raise RuntimeError(f"the model never reached decoder layer {layer}")
    return captured["args"], captured["kwargs"]


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def apply_rope(attn: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` [B, H, L, hd] rotated with the model's own ``apply_rotary_pos_emb`` (from ``attn``'s module).

    cos/sin [B, L, hd] are the decoder's ``position_embeddings`` at x's positions; the rotary embedding
    has already folded M-RoPE's (temporal, height, width) sections into them (Qwen2-VL), so every family
    rotates the same way here as inside its attention.
    """
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return rope(x, x, cos, sin)[0]


def first_layer_attention(vlm: VLM, prompt: Prompt) -> Tensor:
    """A_v^0 (Section 3.3): layer-0 attention from the instruction tokens to the visual tokens.

    Returns Tensor[H, N_v] (float32): per head, the attention each visual token receives, averaged over
    the instruction rows ``prompt.instruction``. Equals slicing ``output_attentions[0]`` of a full eager
    forward, at ~1% of its cost: only layer 0's layernorm, q/k projections and softmax run.
    """
    start, end = prompt.instruction
    if end <= start:
        raise ValueError("the prompt has no instruction tokens (empty question): A_v^0 is undefined")
    if prompt.num_visual == 0:
        raise ValueError("the prompt has no visual tokens: give an image or a video")
    dev = vlm.device
    embeds = prompt.inputs_embeds.to(dev)
    args, kwargs = layer_inputs(vlm, embeds, prompt.position_ids.to(dev), prompt.attention_mask.to(dev))
    layer = vlm.language_model.layers[0]
    attn = layer.self_attn
    cos, sin = kwargs["position_embeddings"]
    hd = attn.head_dim

    with torch.no_grad():
        h = layer.input_layernorm(_hidden(args, kwargs)[:, :end])  # [1, end, D]
        q = attn.q_proj(h[:, start:end]).view(1, end - start, -1, hd)
        k = attn.k_proj(h).view(1, end, -1, hd)
        if hasattr(attn, "q_norm"):  # Qwen3-style q/k norms (not in the supported families; harmless)
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, H, N_u, hd], [1, H_kv, end, hd]
        q = apply_rope(attn, q, cos[..., start:end, :], sin[..., start:end, :])
        k = apply_rope(attn, k, cos[..., :end, :], sin[..., :end, :])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA, as repeat_kv
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [1, H, N_u, end]

        rows = torch.arange(start, end, device=dev)[:, None]
        cols = torch.arange(end, device=dev)[None, :]
        allowed = (cols <= rows) & prompt.attention_mask.to(dev)[0, :end].bool()[None, :]
        window = getattr(attn, "sliding_window", None)
        if window:
            allowed &= (rows - cols) < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return probs[0][..., prompt.visual_pos.to(dev)].mean(1).float().cpu()  # [H, N_v]
