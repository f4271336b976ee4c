"""Attention of the language model: the eager switch and the first-layer attention A_v^0 (Section 3.3).

``eager_attention`` makes the text decoder (only) return attention maps that stay in the autograd graph,
reversibly and per instance. ``first_layer_attention`` computes layer 0's instruction -> visual attention
from layer 0's own modules (input layernorm, q/k projections, the model's rotary embedding and
``apply_rotary_pos_emb``, causal softmax), without running the rest of the LLM. ``apply_rope`` is the
one place RoPE is applied outside the model's forward (here and in FastV's scores).
``head_chunked_attention`` is the eager switch's lean sibling: the text decoder's attention (a function
registered with transformers, eager masks) computes a few heads at a time, and ``head_chunk_handler``
lets the relevance engine take over each call (``relevance(..., head_chunk=c)``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
def _text_attention(vlm: VLM, implementation: str) -> Iterator[None]:
    """Inside the block the text decoder's configs name ``implementation``; restored on exit, exception or
    not (a per-instance switch: nothing global changes)."""
    configs = _text_configs(vlm)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = implementation
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


@contextmanager
def eager_attention(vlm: VLM) -> Iterator[None]:
    """Inside the block the language model uses eager attention (maps returned and differentiable).

    Only the text decoder's config changes (its causal masks follow it, so attention stays causal); the
    vision tower keeps its implementation. The previous setting is restored on exit, exception or not.
    """
    with _text_attention(vlm, "eager"):
        yield


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


def module_device(module: Any) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when the model was dispatched with a
    ``device_map`` (its hook moves the inputs there), else the device of its parameters."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if isinstance(dev, int):  # accelerate's index on the machine's accelerator
        accelerator = getattr(torch, "accelerator", None)
        kind = accelerator.current_accelerator() if accelerator is not None else None
        return torch.device(kind.type if kind is not None else "cuda", dev)
    if dev is not None:
        return torch.device(dev)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


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


def first_layer_attention(vlm: VLM, prompt: Prompt, *, keep_device: bool = False) -> Tensor:
    """A_v^0 (Section 3.3): layer-0 attention from the instruction tokens to the visual tokens.

    Returns Tensor[H, N_v] (float32): per head, the attention each visual token receives, averaged over
    the instruction rows ``prompt.instruction``. Equals slicing ``output_attentions[0]`` of a full eager
    forward, at ~1% of its cost: only layer 0's layernorm, q/k projections and softmax run. On CPU, or
    with ``keep_device`` on the device layer 0 runs on (what the learned pruner feeds f_θ there).
    """
    start, end = prompt.instruction
    if end <= start:
        raise ValueError("the prompt has no instruction tokens (empty question): A_v^0 is undefined")
    if prompt.num_visual == 0:
        raise ValueError("the prompt has no visual tokens: give an image or a video")
    inputs = vlm.device
    args, kwargs = layer_inputs(vlm, prompt.inputs_embeds.to(inputs), prompt.position_ids.to(inputs),
                                prompt.attention_mask.to(inputs))
    layer = vlm.language_model.layers[0]
    dev = module_device(layer)  # with a device_map, layer 0 may sit apart from the embeddings
    attn = layer.self_attn
    cos, sin = (t.to(dev) for t in kwargs["position_embeddings"])
    hd = attn.head_dim

    with torch.no_grad():
        h = layer.input_layernorm(_hidden(args, kwargs)[:, :end].to(dev))  # [1, end, D]
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
        out = probs[0][..., prompt.visual_pos.to(dev)].mean(1).float()  # [H, N_v]
        return out if keep_device else out.cpu()


# --- head-chunked attention (the relevance engine's ``head_chunk`` option) -----------------------------

HEAD_CHUNKED = "explainprune_head_chunked"
"""Name under which the head-chunked attention is registered with transformers (function and mask)."""

CHUNKABLE = ("LlamaAttention", "Qwen2Attention", "Qwen2VLAttention", "Qwen2_5_VLAttention", "Qwen3VLTextAttention",
             "Qwen3VLMoeTextAttention")
"""Attention classes whose eager attention ``head_maps`` reproduces (the supported families)."""

_chunking: ContextVar[dict[str, Any] | None] = ContextVar("explainprune_head_chunking", default=None)


def head_maps(module: Any, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float,
              h0: int, h1: int) -> Tensor:
    """Attention maps of query heads ``h0 .. h1-1``, [B, h1-h0, n, n], exactly as eager attention makes them.

    query [B, H, n, hd], key [B, H_kv, n, hd] (after RoPE): GQA picks key head h // groups for query
    head h (what ``repeat_kv`` does), scores = q k^T * scaling + the eager 4D additive mask, softmax in
    float32, cast back to the query dtype. Differentiable; only these heads' maps are materialized.
    """
    groups = module.num_key_value_groups
    kv = torch.arange(h0, h1, device=query.device) // groups
    scores = torch.matmul(query[:, h0:h1], key[:, kv].transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def head_chunked_output(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        scaling: float, chunk: int) -> Tensor:
    """Eager attention's output [B, n, H, hd], computed ``chunk`` query heads at a time (head_maps)."""
    heads = query.shape[1]
    kv = torch.arange(heads, device=query.device) // module.num_key_value_groups
    parts = []
    for h0 in range(0, heads, chunk):
        h1 = min(heads, h0 + chunk)
        parts.append(torch.matmul(head_maps(module, query, key, attention_mask, scaling, h0, h1), value[:, kv[h0:h1]]))
    return torch.cat(parts, 1).transpose(1, 2).contiguous()


def _head_chunked_attention(module: Any, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: eager attention, a chunk of heads at a time.

    Returns (output [B, n, H, hd], None): no attention weights (all heads' maps at once are what this
    avoids). Inside ``head_chunk_handler(fn)`` the call is handed to ``fn`` instead.
    """
    state = _chunking.get()
    if state is None:
        raise RuntimeError(f"attention implementation {HEAD_CHUNKED!r} used outside head_chunked_attention()")
    if dropout or module.training:
        raise RuntimeError("head-chunked attention supports eval mode only (no attention dropout)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("head-chunked attention does not implement logit soft-capping or sinks")
    scaling = module.scaling if scaling is None else scaling
    if state["handler"] is not None:
        return state["handler"](module, query, key, value, attention_mask, scaling), None
    return head_chunked_output(module, query, key, value, attention_mask, scaling, state["chunk"]), None


@contextmanager
def head_chunked_attention(vlm: VLM, chunk: int) -> Iterator[None]:
    """Like ``eager_attention``, but the text decoder's attention runs ``chunk`` heads at a time.

    The masks are the eager ones (4D additive, built by transformers' ``eager_mask`` under the registered
    name); the attention output equals eager attention's. Raises NotImplementedError for attention classes
    outside ``CHUNKABLE`` (their eager attention may differ: soft-capping, sinks, ...).
    """
    if int(chunk) < 1:
        raise ValueError(f"head chunk must be a positive number of heads, got {chunk!r}")
    unknown = sorted({type(layer.self_attn).__name__ for layer in vlm.language_model.layers} - set(CHUNKABLE))
    if unknown:
        raise NotImplementedError(f"head-chunked relevance is implemented for {', '.join(CHUNKABLE)} only, "
                                  f"not {', '.join(unknown)}; use head_chunk=None")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HEAD_CHUNKED, _head_chunked_attention)
    AttentionMaskInterface.register(HEAD_CHUNKED, eager_mask)
    token = _chunking.set({"chunk": int(chunk), "handler": None})
    try:
        with _text_attention(vlm, HEAD_CHUNKED):
            yield
    finally:
        _chunking.reset(token)


@contextmanager
def head_chunk_handler(handler: Any) -> Iterator[None]:
    """Inside ``head_chunked_attention``: each attention call goes to
    ``handler(module, query, key, value, attention_mask, scaling) -> output [B, n, H, hd]``."""
    state = _chunking.get()
    if state is None:
        raise RuntimeError("head_chunk_handler() needs an enclosing head_chunked_attention()")
    saved, state["handler"] = state["handler"], handler
    try:
        yield
    finally:
        state["handler"] = saved
