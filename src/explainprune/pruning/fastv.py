"""FastV (Chen et al., 2024): prune visual tokens INSIDE the LLM, at layer K.

Layers 0..K-1 run on the full sequence. The visual tokens are ranked by the attention the LAST prompt
token gives them at layer K-1 (softmax row, mean over heads); the shared ``select`` keeps the top
``ratio``, and layers K..N-1 run on the shorter sequence, their KV cache included, so decode is cheaper too.

It is implemented with reversible forward pre-hooks on the model's own decoder layers (no class is
patched; every hook is removed on exit, also after an exception), so the unchanged ``generate`` runs
prefill and decode:
  - ``q_proj`` / ``k_proj`` of layer K-1 record their outputs during prefill (no extra projection);
  - layer K's pre-hook scores and selects, then drops the pruned rows of the hidden states;
  - every layer >= K gets its rotary embeddings and position ids gathered at the kept tokens (which keep
    their ORIGINAL positions) and, when masks are needed (padding, or eager attention), its own
    additive mask over the kept rows and the pruned KV cache.
A list of prompts runs as one left-padded batch; each keeps its own count and is re-padded at layer K.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from explainprune.attention import _Stop, apply_rope, module_device  # _Stop: the layer-K hook's early exit
from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.pruning.base import Pruner, register, select


def last_token_attention(attn: Any, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                         keys_valid: Tensor | None = None) -> Tensor:
    """Softmax attention row of the last token over all L tokens, per head, as ``attn`` computes it.

    attn: the layer's self-attention module (head_dim, scaling, and the model's RoPE via ``apply_rope``);
    q: q_proj output [B, L or 1, H*hd] (only its last row is used); k: k_proj output [B, L, H_kv*hd];
    cos/sin [B, L, hd] at the original positions; keys_valid BoolTensor[B, L] (False on left padding).
    Returns Tensor[B, H, L] (float32; causal: the last token sees every position).
    """
    b, n, _ = k.shape
    q_last = q[:, -1:].view(b, 1, -1, attn.head_dim)
    keys = k.view(b, n, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head q/k norms, before RoPE as in the attention's forward
        q_last, keys = attn.q_norm(q_last), attn.k_norm(keys)
    q_last, keys = q_last.transpose(1, 2), keys.transpose(1, 2)            # [B, H, 1, hd], [B, Hkv, L, hd]
    q_last = apply_rope(attn, q_last, cos[:, -1:], sin[:, -1:])
    keys = apply_rope(attn, keys, cos, sin)
    keys = keys.repeat_interleave(q_last.shape[1] // keys.shape[1], dim=1)  # GQA: share kv heads
    logits = (q_last.float() @ keys.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, L]
    if keys_valid is not None:
        logits = logits.masked_fill(~keys_valid[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


@dataclass
class FastVState:
    """What happened during one FastV prefill of a (left-padded) batch; lists hold one entry per prompt.

    scores       [Tensor[N_v]]    mean-over-heads attention of the last token at layer K-1
    keep         [LongTensor[k]]  sorted kept visual indices (into 0..N_v-1)
    index        LongTensor[B, L'] batch rows feeding layers >= K (left-padded; pads repeat a kept row)
    valid        BoolTensor[B, L'] False on that padding
    layer_tokens list[int]        sequence length each decoder layer processed in prefill (padded batch)
    index / valid live on layer K's device; masks caches each device's mask for the current step.
    """

    scores: list[Tensor] = field(default_factory=list)
    keep: list[Tensor] = field(default_factory=list)
    index: Tensor | None = None
    valid: Tensor | None = None
    steps: int = 0
    layer_tokens: list[int] = field(default_factory=list)
    all_valid: bool = True
    masks: dict = field(default_factory=dict, repr=False)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B or 1, L, ...] -> [B, L', ...]: per batch row b, the rows ``index[b]``."""
    index = index.to(x.device)
    x = x.expand(index.shape[0], *x.shape[1:])
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _additive_mask(valid: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, q, kv] additive mask: causal over the last ``queries`` positions, padding (valid False) hidden."""
    kv = valid.shape[1]
    causal = torch.ones(queries, kv, dtype=torch.bool, device=valid.device).tril(kv - queries)
    allowed = causal[None, None] & valid[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _layer_mask(state: FastVState, prefill: bool, dtype: torch.dtype, device: torch.device,
                implementation: str) -> Tensor:
    """The mask of a layer >= K over the kept rows (prefill) or the pruned KV cache (decode step), on
    ``device``: 2-D bool [B, kv] for flash attention (what transformers' ``flash_attention_mask`` gives
    FA2; varlen by this mask, never guessed from the gapped position ids), else 4-D additive
    [B, 1, q, kv]. Built once per device and step, shared by the layers on that device."""
    flash = "flash" in implementation
    key = (prefill, state.steps, device, dtype, flash)
    if key not in state.masks:
        if len(state.masks) > 8:
            state.masks.clear()
        valid = state.valid.to(device)
        new = torch.ones(valid.shape[0], 0 if prefill else state.steps, dtype=torch.bool, device=device)
        valid = torch.cat([valid, new], 1)
        state.masks[key] = valid if flash else _additive_mask(valid, state.valid.shape[1] if prefill else 1, dtype)
    return state.masks[key]


def _restrict(kwargs: dict[str, Any], state: FastVState, full_len: int, prefill: bool, dtype: torch.dtype,
              device: torch.device, implementation: str = "sdpa") -> dict[str, Any]:
    """A layer >= K's keyword inputs restricted to the kept rows (prefill) and to the pruned KV cache;
    masks and indices are made on ``device`` (the layer's own device)."""
    out = dict(kwargs)
    if prefill:
        out["position_embeddings"] = tuple(_gather_rows(t, state.index) for t in kwargs["position_embeddings"])
        pos = kwargs.get("position_ids")
        if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[-1] == full_len:
            out["position_ids"] = _gather_rows(pos, state.index)
    padded = not state.all_valid
    if torch.is_tensor(kwargs.get("attention_mask")) or padded or "flash" in implementation:
        out["attention_mask"] = _layer_mask(state, prefill, dtype, device, implementation)
    return out


@contextmanager
def fastv_hooks(vlm: VLM, prompts: Prompt | list[Prompt], ratio: float, layer: int, *,
                scores_only: bool = False) -> Iterator[FastVState]:
    """Hooks that make the next forward / generate on ``prompts`` (one, or a list left-padded as
    ``VLM.generate`` pads it) run FastV.

    With ``scores_only`` the prefill stops at layer K (raise caught by the caller, see ``FastV.score``).
    Yields the FastVState filled during prefill. All hooks are removed on exit.
    """
    prompts = [prompts] if isinstance(prompts, Prompt) else list(prompts)
    layers = vlm.language_model.layers
    n_layers = len(layers)
    if not 1 <= layer < n_layers:
        raise ValueError(f"fastv layer must be in 1..{n_layers - 1} for a {n_layers}-layer LLM; got {layer}")
    if any(p.num_visual == 0 for p in prompts):
        raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
    full_len = max(p.length for p in prompts)
    pads = [full_len - p.length for p in prompts]
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

    def choose(device: torch.device) -> None:
        """Scores from layer K-1's captured q/k, then the kept rows of every prompt, left-padded."""
        cos, sin = captured["rope"]
        q, k = captured["q"], captured["k"]
        keys_valid = torch.arange(full_len, device=k.device)[None] >= torch.tensor(pads, device=k.device)[:, None]
        att = last_token_attention(attn, q, k.to(q.device), cos.to(q.device), sin.to(q.device),
                                   keys_valid.to(q.device)).mean(1).cpu()     # [B, L]
        captured.clear()
        rows = []
        for b, (p, pad) in enumerate(zip(prompts, pads)):
            state.scores.append(att[b, pad + p.visual_pos])
            if not scores_only:
                state.keep.append(select(state.scores[-1], ratio, p.num_visual))
                rows.append(pad + p.kept_positions(state.keep[-1]))
        if scores_only:
            raise _Stop
        longest = max(len(r) for r in rows)
        index = torch.stack([torch.cat([r[:1].repeat(longest - len(r)), r]) for r in rows])
        valid = torch.arange(longest)[None] >= torch.tensor([longest - len(r) for r in rows])[:, None]
        state.all_valid = bool(valid.all())
        state.index, state.valid = index.to(device), valid.to(device)
        state.masks.clear()
        if vlm.active_residuals is not None:  # DeepStack rows (Qwen3-VL) follow the kept rows
            vlm.active_residuals.reindex(index, valid)

    def prune(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = kwargs["position_embeddings"][0].shape[-2] == full_len and full_len > 1
        if module is layers[layer]:
            if prefill:
                choose(module_device(module))
                hidden = _gather_rows(hidden, state.index)
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            elif state.index is not None:
                state.steps += 1
        if state.index is None:
            return None
        implementation = getattr(module.self_attn.config, "_attn_implementation", None) or "sdpa"
        return args, _restrict(kwargs, state, full_len, prefill, hidden.dtype, module_device(module),
                               implementation)

    try:
        handles.append(attn.q_proj.register_forward_hook(capture("q", last_only=True)))
        handles.append(attn.k_proj.register_forward_hook(capture("k", last_only=False)))
        handles.append(attn.register_forward_pre_hook(capture_rope, with_kwargs=True))
        for i, decoder_layer in enumerate(layers):
            if i >= layer:
                handles.append(decoder_layer.register_forward_pre_hook(prune, with_kwargs=True))
        for decoder_layer in layers:  # registered last: counts the (already restricted) input
            handles.append(decoder_layer.register_forward_pre_hook(count, with_kwargs=True))
        yield state
    finally:
        for h in handles:
            h.remove()


@dataclass
class FastVResult(GenerationResult):
    """A GenerationResult plus what FastV kept: ``visual_tokens`` counts the visual tokens of layers >= K,
    ``layer_tokens`` the prompt tokens each layer processes."""

    keep: Tensor | None = field(default=None, repr=False)
    layer_tokens: list[int] = field(default_factory=list)


@register("fastv")
@dataclass
class FastV(Pruner):
    """FastV: keep the visual tokens the last prompt token attends to most at layer K-1, from layer K on.

    ``layer`` = K (FastV's default 2; the paper also uses 4). ``score`` runs layers 0..K-1 only.
    """

    layer: int = 2  # type: ignore[misc]  # overrides the ClassVar default: the layer it prunes at

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"fastv's layer K must be an integer >= 1 (layers 0..K-1 see every token); "
                             f"got {self.layer!r}")

    @torch.no_grad()
    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """Tensor[N_v]: the last prompt token's attention at layer K-1, averaged over heads."""
        dev = vlm.device
        with fastv_hooks(vlm, prompt, 1.0, self.layer, scores_only=True) as state:
            try:
                vlm.forward(prompt.inputs_embeds.to(dev), prompt.position_ids.to(dev),
                            prompt.attention_mask.to(dev), prompt=prompt, use_cache=False)
            except _Stop:
                pass
        return state.scores[0]

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> FastVResult | list[FastVResult]:
        """Greedy generation with FastV pruning at layer K (prefill and the KV cache of layers >= K).

        A list of prompts runs as one left-padded batch (ragged after pruning: re-padded at layer K).
        """
        select(torch.ones(1), ratio)  # validates the ratio before any work
        single = isinstance(prompt, Prompt)
        prompts = [prompt] if single else list(prompt)
        with fastv_hooks(vlm, prompts, ratio, self.layer) as state:
            outs = vlm.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
        n_layers = len(vlm.language_model.layers)
        results = []
        for p, out, keep in zip(prompts, outs, state.keep):
            kept_len = p.length - p.num_visual + len(keep)
            results.append(FastVResult(
                text=out.text, token_ids=out.token_ids, prompt_tokens=kept_len, visual_tokens=len(keep),
                logits=out.logits, keep=keep,
                layer_tokens=[p.length] * self.layer + [kept_len] * (n_layers - self.layer)))
        return results[0] if single else results
