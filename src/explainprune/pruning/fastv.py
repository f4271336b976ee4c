"""FastV (Chen et al., 2024): prune visual tokens INSIDE the LLM, at layer K.

Layers 0..K-1 run on the full sequence. The visual tokens are ranked by the attention the LAST prompt
token gives them at layer K-1 (softmax row, mean over heads); the shared ``select`` keeps the top
``ratio``, and layers K..N-1 run on the shorter sequence, their KV cache included, so decode is cheaper too.

It is implemented with reversible forward pre-hooks on the model's own decoder layers (no class is
patched; every hook is removed on exit, also after an exception), so the unchanged ``generate`` runs
prefill and decode:
  - ``q_proj`` / ``k_proj`` of layer K-1 record their outputs during prefill (no extra projection);
  - layer K's pre-hook scores and selects, then drops the pruned rows of the hidden states;
  - every layer >= K gets its rotary embeddings, position ids and 4-D mask sliced to the kept tokens
    (kept tokens keep their ORIGINAL positions); during decode only the mask's key columns are sliced.
Batch size 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.pruning.base import Pruner, register, select


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (rotate-half form, as in Llama / Qwen2): x [B, H, L, hd], cos/sin [B, L, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def last_token_attention(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, head_dim: int,
                         scaling: float) -> Tensor:
    """Softmax attention row of the last token over all L tokens, per head.

    q: q_proj output [B, L or 1, H*hd] (only its last row is used); k: k_proj output [B, L, H_kv*hd];
    cos/sin [B, L, hd] at the original positions. Returns Tensor[B, H, L] (float32; causal: the last
    token sees every position).
    """
    b, n, _ = k.shape
    q_last = q[:, -1:].view(b, 1, -1, head_dim).transpose(1, 2)           # [B, H, 1, hd]
    keys = k.view(b, n, -1, head_dim).transpose(1, 2)                       # [B, Hkv, L, hd]
    q_last = rotate(q_last, cos[:, -1:], sin[:, -1:])
    keys = rotate(keys, cos, sin)
    keys = keys.repeat_interleave(q_last.shape[1] // keys.shape[1], dim=1)  # GQA: share kv heads
    logits = (q_last.float() @ keys.float().transpose(-1, -2)).squeeze(2) * scaling
    return torch.softmax(logits, dim=-1)


@dataclass
class FastVState:
    """What happened during one FastV prefill.

    scores       Tensor[N_v]  mean-over-heads attention of the last token at layer K-1
    keep         LongTensor[k] sorted kept visual indices (into 0..N_v-1)
    rows         LongTensor[L_kept] sequence indices surviving from layer K on
    layer_tokens list[int]    sequence length each decoder layer processed in prefill
    """

    scores: Tensor | None = None
    keep: Tensor | None = None
    rows: Tensor | None = None
    layer_tokens: list[int] = field(default_factory=list)


class _Stop(Exception):
    """Raised by the layer-K hook when only the scores are wanted (no layer >= K runs)."""


def _slice_kwargs(kwargs: dict[str, Any], rows: Tensor, full_len: int, prefill: bool) -> dict[str, Any]:
    """Restrict a decoder layer's keyword inputs to the kept tokens (rows) of a length-``full_len`` prompt."""
    out = dict(kwargs)
    pe = kwargs.get("position_embeddings")
    if prefill and pe is not None:
        out["position_embeddings"] = tuple(t.index_select(-2, rows.to(t.device)) for t in pe)
    pos = kwargs.get("position_ids")
    if prefill and torch.is_tensor(pos) and pos.shape[-1] == full_len:
        out["position_ids"] = pos.index_select(-1, rows.to(pos.device))
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 4:
        cols = torch.cat([rows, torch.arange(full_len, mask.shape[-1])]).to(mask.device)
        mask = mask.index_select(-1, cols)
        if prefill:
            mask = mask.index_select(-2, rows.to(mask.device))
        out["attention_mask"] = mask
    return out


@contextmanager
def fastv_hooks(vlm: VLM, prompt: Prompt, ratio: float, layer: int, *,
                scores_only: bool = False) -> Iterator[FastVState]:
    """Hooks that make the next forward / generate on ``prompt`` (batch 1, unpadded) run FastV.

    With ``scores_only`` the prefill stops at layer K (raise caught by the caller, see ``FastV.score``).
    Yields the FastVState filled during prefill. All hooks are removed on exit.
    """
    layers = vlm.language_model.layers
    n_layers = len(layers)
    if not 1 <= layer < n_layers:
        raise ValueError(f"fastv layer must be in 1..{n_layers - 1} for a {n_layers}-layer LLM; got {layer}")
    if prompt.num_visual == 0:
        raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
    full_len = prompt.length
    state = FastVState()
    captured: dict[str, Any] = {}
    attn = layers[layer - 1].self_attn
    handles = []

    def capture(name: str, last_only: bool):
        def hook(module, args, output):
            if output.shape[1] == full_len and full_len > 1:
                captured[name] = (output[:, -1:] if last_only else output).detach()
        return hook

    def capture_rope(module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is not None and pe[0].shape[-2] == full_len:
            captured["rope"] = pe

    def count(module, args, kwargs):
        if len(state.layer_tokens) < n_layers:  # the first n_layers calls are the prefill
            hidden = args[0] if args else kwargs["hidden_states"]
            state.layer_tokens.append(int(hidden.shape[1]))

    def prune(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = kwargs["position_embeddings"][0].shape[-2] == full_len and full_len > 1
        if prefill and module is layers[layer]:
            cos, sin = captured["rope"]
            att = last_token_attention(captured["q"], captured["k"], cos, sin, attn.head_dim, attn.scaling)
            captured.clear()
            state.scores = att.mean(1)[0, prompt.visual_pos.to(att.device)].cpu()   # [N_v]
            if scores_only:
                raise _Stop
            state.keep = select(state.scores, ratio, prompt.num_visual)
            state.rows = prompt.kept_positions(state.keep)
            hidden = hidden.index_select(1, state.rows.to(hidden.device))
            args = (hidden, *args[1:]) if args else args
            if not args:
                kwargs = {**kwargs, "hidden_states": hidden}
        if state.rows is None:
            return None
        return args, _slice_kwargs(kwargs, state.rows, full_len, prefill)

    try:
        handles.append(attn.q_proj.register_forward_hook(capture("q", last_only=True)))
        handles.append(attn.k_proj.register_forward_hook(capture("k", last_only=False)))
        handles.append(attn.register_forward_pre_hook(capture_rope, with_kwargs=True))
        for i, decoder_layer in enumerate(layers):
            if i >= layer:
                handles.append(decoder_layer.register_forward_pre_hook(prune, with_kwargs=True))
        for decoder_layer in layers:  # registered last: counts the (already sliced) input
            handles.append(decoder_layer.register_forward_pre_hook(count, with_kwargs=True))
        yield state
    finally:
        for h in handles:
            h.remove()


@dataclass
class FastVResult(GenerationResult):
    """A GenerationResult plus what FastV kept: ``visual_tokens`` counts the visual tokens of layers >= K."""

    keep: Tensor | None = field(default=None, repr=False)
    layer_tokens: list[int] = field(default_factory=list)


@register("fastv")
@dataclass
class FastV(Pruner):
    """FastV: keep the visual tokens the last prompt token attends to most at layer K-1, from layer K on.

    ``layer`` = K (FastV's default 2; the paper also uses 4). ``score`` runs layers 0..K-1 only.
    """

    layer: int = 2  # type: ignore[misc]  # overrides the ClassVar default: the layer it prunes at

    @torch.no_grad()
    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: the last prompt token's attention at layer K-1, averaged over heads."""
        dev = vlm.device
        with fastv_hooks(vlm, prompt, 1.0, self.layer, scores_only=True) as state:
            try:
                vlm.forward(prompt.inputs_embeds.to(dev), prompt.position_ids.to(dev),
                            prompt.attention_mask.to(dev), use_cache=False)
            except _Stop:
                pass
        return state.scores

    def generate(self, vlm: VLM, prompt: Prompt, ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> FastVResult:
        """Greedy generation with FastV pruning at layer K (prefill and the KV cache of layers >= K)."""
        select(torch.ones(max(prompt.num_visual, 1)), ratio)  # validates the ratio before any work
        with fastv_hooks(vlm, prompt, ratio, self.layer) as state:
            out = vlm.generate(prompt, keep=None, max_new_tokens=max_new_tokens, **kwargs)
        kept = len(state.keep)
        return FastVResult(text=out.text, token_ids=out.token_ids,
                           prompt_tokens=out.prompt_tokens - prompt.num_visual + kept, visual_tokens=kept,
                           logits=out.logits, keep=state.keep, layer_tokens=state.layer_tokens)
