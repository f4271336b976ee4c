"""Pruning INSIDE the LLM at one or more layers: the machinery FastV, PyramidDrop and DART share.

A method gives a list of ``Stage`` s: before decoder layer K of each stage, a chooser sees the hidden
states entering layer K (and, on request, layer K-1's q/k projections) and keeps some of each prompt's
remaining visual tokens; layers >= K run on the shorter sequence, their KV cache included, so decode is
cheaper too. Stages nest: a later stage chooses among the tokens the earlier ones kept.

Everything runs through reversible forward (pre-)hooks on the model's own decoder layers (no class is
patched; every hook is removed on exit, also after an exception), so the unchanged ``generate`` runs
prefill and decode:
  - with ``capture_previous``, layer K-1's ``q_proj`` (last row) / ``k_proj`` outputs and rotary
    embeddings are recorded during prefill (no extra projection);
  - layer K's pre-hook calls the stage's chooser, then drops the pruned rows of the hidden states;
  - every layer >= the first K gets its rotary embeddings and position ids gathered at the kept tokens
    (which keep their ORIGINAL positions) and, when masks are needed (padding, or eager attention), its
    own additive mask over its kept rows and its pruned KV cache;
  - with ``positions="compact"`` (PyramidDrop's authors, 1-D RoPE only) the rows of each stage are
    renumbered 0..L'-1 instead, decode steps continuing from L' (RoPE recomputed by the model's own
    ``rotary_emb``), as ``pdrop_rank_drop`` in the authors' ``modeling_llama_pdrop.py`` does.
A list of prompts runs as one left-padded batch; each keeps its own count and is re-padded at every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from explainprune.attention import _Stop, apply_rope, module_device
from explainprune.models.base import VLM, GenerationResult, Prompt


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
class StageContext:
    """What a stage's chooser sees before decoder layer ``layer`` in prefill (B prompts, Lc current rows).

    hidden       Tensor[B, Lc, D]   hidden states entering layer K (left-padded)
    rope         (cos, sin)         rotary embeddings of the current rows, [B, Lc, hd] each
    valid        BoolTensor[B, Lc]  False on left padding
    visual_rows  [LongTensor[n_b]]  per prompt: current rows of its remaining visual tokens (sequence order)
    visual_ids   [LongTensor[n_b]]  their original visual indices (0..N_v-1)
    text_rows    [LongTensor[t_b]]  current rows of the text after the prompt's last visual token
    budgets      [int]              visual tokens each prompt keeps after this stage (<= n_b)
    previous     dict               with ``capture_previous``: layer K-1's "q" (last row), "k", "rope", "attn"
    """

    vlm: VLM
    layer: int
    hidden: Tensor
    rope: tuple[Tensor, Tensor]
    valid: Tensor
    visual_rows: list[Tensor]
    visual_ids: list[Tensor]
    text_rows: list[Tensor]
    budgets: list[int]
    previous: dict[str, Any] = field(default_factory=dict)

    def previous_attention(self) -> Tensor:
        """Layer K-1's last-token attention over the current rows, mean over heads: Tensor[B, Lc] (FastV)."""
        p = self.previous
        q = p["q"]
        cos, sin = (t.to(q.device) for t in p["rope"])  # layers K-1 and K may sit on different devices
        return last_token_attention(p["attn"], q, p["k"].to(q.device), cos, sin, self.valid.to(q.device)).mean(1)


Chooser = Callable[[StageContext], list[Tensor]]
"""A stage's rule: per prompt, the positions (into ``visual_rows[b]``) it keeps, ``budgets[b]`` of them."""


@dataclass(frozen=True)
class Stage:
    """Prune before decoder layer ``layer``, keeping ``count(N_v)`` of each prompt's visual tokens."""

    layer: int
    count: Callable[[int], int]
    choose: Chooser


@dataclass
class InLLMState:
    """What happened during one prefill of a (left-padded) batch; lists hold one entry per prompt.

    keep         [LongTensor[k]]   sorted original visual indices kept after the LAST stage
    stage_keep   [[LongTensor]]    per stage, per prompt: the kept original visual indices (sorted)
    index        LongTensor[B, L'] full-sequence rows feeding the layers of the latest stage (left-padded)
    valid        BoolTensor[B, L'] False on that padding
    layer_tokens list[int]         sequence length each decoder layer processed in prefill (padded batch)
    scores       [Tensor]          what a chooser chose to record (FastV: its attention scores)
    """

    keep: list[Tensor] = field(default_factory=list)
    stage_keep: list[list[Tensor]] = field(default_factory=list)
    index: Tensor | None = None
    valid: Tensor | None = None
    steps: int = 0
    layer_tokens: list[int] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    per_stage: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (index, valid) of each stage (CPU)
    all_valid: list[bool] = field(default_factory=list)  # per stage: no padding left after it
    masks: dict = field(default_factory=dict, repr=False)  # (stage, prefill, step, device, ...) -> mask
    compact: list[Tensor] = field(default_factory=list)  # positions="compact": per stage, [B, L'] new positions

    def visual_per_layer(self, b: int, num_visual: int, stages: Sequence[Stage], num_layers: int) -> list[int]:
        """Visual tokens prompt ``b`` keeps in each decoder layer (prefill and its KV cache)."""
        counts = [num_visual] * num_layers
        for s, stage in enumerate(stages):
            for i in range(stage.layer, num_layers):
                counts[i] = len(self.stage_keep[s][b])
        return counts


def stage_budget(stage: Stage, num_visual: int, remaining: int) -> int:
    """Visual tokens a prompt keeps after ``stage``: ``stage.count(N_v)``, at least 1, at most what remains."""
    return min(remaining, max(1, int(stage.count(num_visual))))


def stage_tokens(stages: Sequence[Stage], num_visual: int, num_layers: int) -> list[int]:
    """Visual tokens each decoder layer keeps under ``stages`` (the budgets ``inllm_hooks`` gives the
    choosers; what ``InLLMState.visual_per_layer`` then measures): list[int] of length ``num_layers``."""
    counts, remaining = [num_visual] * num_layers, num_visual
    for stage in stages:
        if not 1 <= stage.layer < num_layers:
            raise ValueError(f"pruning layer must be in 1..{num_layers - 1} for a {num_layers}-layer LLM; "
                             f"got {stage.layer}")
        remaining = stage_budget(stage, num_visual, remaining)
        counts[stage.layer:] = [remaining] * (num_layers - stage.layer)
    return counts


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


def _layer_mask(valid: Tensor, steps: int, prefill: bool, dtype: torch.dtype, device: torch.device,
                flash: bool) -> Tensor:
    """A pruned layer's mask over its kept rows (prefill) or its pruned KV cache (decode step), on
    ``device``: 2-D bool [B, kv] for flash attention (what transformers' ``flash_attention_mask`` gives
    FA2; varlen by this mask, never guessed from the gapped position ids), else 4-D additive [B, 1, q, kv]."""
    valid = valid.to(device)
    new = torch.ones(valid.shape[0], 0 if prefill else steps, dtype=torch.bool, device=device)
    full = torch.cat([valid, new], 1)
    return full if flash else _additive_mask(full, valid.shape[1] if prefill else 1, dtype)


def _rope_at(rotary: Any, pos: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(cos, sin) [B, L, hd] of 1-D positions ``pos`` [B, L] from the model's own rotary embedding."""
    dev = next(iter(rotary.buffers())).device
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=dev), pos.to(dev))
    return cos.to(device), sin.to(device)


def _compact_inputs(out: dict[str, Any], stage: int, state: InLLMState, prefill: bool, rotary: Any,
                    dtype: torch.dtype, device: torch.device) -> None:
    """positions="compact": the stage's rows at positions 0..L'-1 (prefill), decode step t at L' + t - 1."""
    valid = state.per_stage[stage][1]
    pos = state.compact[stage] if prefill else (valid.sum(1, keepdim=True) + state.steps - 1)
    key = ("rope", stage, prefill, state.steps, device, dtype)
    if key not in state.masks:
        state.masks[key] = _rope_at(rotary, pos, dtype, device)
    out["position_embeddings"] = state.masks[key]
    if torch.is_tensor(out.get("position_ids")) and out["position_ids"].dim() == 2:
        out["position_ids"] = pos.to(out["position_ids"].device)


def _restrict(kwargs: dict[str, Any], stage: int, state: InLLMState, full_len: int, prefill: bool,
              dtype: torch.dtype, device: torch.device, implementation: str = "sdpa",
              rotary: Any = None) -> dict[str, Any]:
    """A pruned layer's keyword inputs restricted to its stage's kept rows (prefill) and to its pruned KV
    cache; masks are made on ``device`` (the layer's own), once per stage, device and step. With
    ``rotary`` (positions="compact") the rows get the renumbered positions instead of their original ones."""
    index, valid = state.per_stage[stage]
    out = dict(kwargs)
    if prefill:
        out["position_embeddings"] = tuple(_gather_rows(t, index) for t in kwargs["position_embeddings"])
        pos = kwargs.get("position_ids")
        if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[-1] == full_len:
            out["position_ids"] = _gather_rows(pos, index)
    if rotary is not None:
        _compact_inputs(out, stage, state, prefill, rotary, dtype, device)
    flash = "flash" in implementation
    if torch.is_tensor(kwargs.get("attention_mask")) or not state.all_valid[stage] or flash:
        key = (stage, prefill, state.steps, device, dtype, flash)
        if key not in state.masks:
            if len(state.masks) > 16:
                state.masks.clear()
            state.masks[key] = _layer_mask(valid, state.steps, prefill, dtype, device, flash)
        out["attention_mask"] = state.masks[key]
    return out


def _repad(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Left-pad per-prompt row lists into [B, L'] (pads repeat the first row) and its validity mask."""
    longest = max(len(r) for r in rows)
    index = torch.stack([torch.cat([r[:1].repeat(longest - len(r)), r]) for r in rows])
    valid = torch.arange(longest)[None] >= torch.tensor([longest - len(r) for r in rows])[:, None]
    return index, valid


@contextmanager
def inllm_hooks(vlm: VLM, prompts: Prompt | list[Prompt], stages: Sequence[Stage], *,
                capture_previous: bool = False, stop_after_first: bool = False,
                positions: str = "original") -> Iterator[InLLMState]:
    """Hooks that make the next forward / generate on ``prompts`` (one, or a list left-padded as
    ``VLM.generate`` pads it) prune at every stage. With ``stop_after_first`` the prefill stops right after
    the first stage chose (``attention._Stop`` is raised; the caller catches it). ``positions``: "original"
    (kept tokens keep their positions) or "compact" (each stage renumbered 0..L'-1; 1-D RoPE only).
    Yields the InLLMState filled during prefill. All hooks are removed on exit."""
    prompts = [prompts] if isinstance(prompts, Prompt) else list(prompts)
    if positions not in ("original", "compact"):
        raise ValueError(f"positions must be 'original' or 'compact'; got {positions!r}")
    if positions == "compact" and any(p.position_ids.dim() != 2 for p in prompts):
        raise ValueError("positions='compact' renumbers 1-D positions; this family uses 3-row M-RoPE positions "
                         "(use positions='original')")
    rotary = vlm.language_model.rotary_emb if positions == "compact" else None
    layers = vlm.language_model.layers
    n_layers = len(layers)
    ks = [s.layer for s in stages]
    if not ks or any(not 1 <= k < n_layers for k in ks) or ks != sorted(set(ks)):
        raise ValueError(f"pruning layers must be increasing, each in 1..{n_layers - 1} for a {n_layers}-layer "
                         f"LLM; got {ks}")
    if any(p.num_visual == 0 for p in prompts):
        raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
    full_len = max(p.length for p in prompts)
    pads = [full_len - p.length for p in prompts]
    state = InLLMState()
    stage_at = {s.layer: i for i, s in enumerate(stages)}
    stage_of = [max([i for i, k in enumerate(ks) if k <= j], default=-1) for j in range(n_layers)]
    # per prompt, in current-row coordinates (full rows until the first stage)
    cur: dict[str, Any] = {
        "visual_rows": [pad + p.visual_pos for p, pad in zip(prompts, pads)],
        "visual_ids": [torch.arange(p.num_visual) for p in prompts],
        "text_rows": [pad + _text_after(p) for p, pad in zip(prompts, pads)],
        "valid": torch.arange(full_len)[None] >= torch.tensor(pads)[:, None],
        "index": torch.arange(full_len)[None].repeat(len(prompts), 1),
    }
    captured: dict[int, dict[str, Any]] = {}
    flags = {"prefill": False}
    handles = []

    def capture(layer_idx: int, name: str, last_only: bool):
        def hook(module, args, output):
            if flags["prefill"]:
                captured.setdefault(layer_idx, {})[name] = (output[:, -1:] if last_only else output).detach()
        return hook

    def capture_rope(layer_idx: int):
        def hook(module, args, kwargs):
            if flags["prefill"] and kwargs.get("position_embeddings") is not None:
                captured.setdefault(layer_idx, {})["rope"] = kwargs["position_embeddings"]
        return hook

    def count(module, args, kwargs):
        if len(state.layer_tokens) < n_layers:  # the first n_layers calls are the prefill
            hidden = args[0] if args else kwargs["hidden_states"]
            state.layer_tokens.append(int(hidden.shape[1]))

    def choose(s: int, hidden: Tensor, rope_full: tuple[Tensor, Tensor]) -> Tensor:
        """Run stage ``s``'s chooser; update ``cur`` and the state; returns the local gather index [B, L']."""
        stage = stages[s]
        rope = tuple(_gather_rows(t, cur["index"]) for t in rope_full)
        if rotary is not None and s > 0:  # compact: the current rows sit at the previous stage's new positions
            rope = _rope_at(rotary, state.compact[s - 1], rope[0].dtype, rope[0].device)
        prev = dict(captured.pop(stage.layer - 1, {}))
        if capture_previous:
            prev["attn"] = layers[stage.layer - 1].self_attn
        budgets = [stage_budget(stage, p.num_visual, len(v)) for p, v in zip(prompts, cur["visual_ids"])]
        ctx = StageContext(vlm=vlm, layer=stage.layer, hidden=hidden, rope=rope, valid=cur["valid"].to(hidden.device),
                           visual_rows=cur["visual_rows"], visual_ids=cur["visual_ids"], text_rows=cur["text_rows"],
                           budgets=budgets, previous=prev)
        chosen = [torch.sort(torch.as_tensor(c, dtype=torch.long).cpu().flatten()).values for c in stage.choose(ctx)]
        local_rows, vis_rows, vis_ids, text_rows = [], [], [], []
        for b, c in enumerate(chosen):
            if len(c) != budgets[b] or len(torch.unique(c)) != len(c):
                raise RuntimeError(f"stage at layer {stage.layer} chose {len(c)} tokens; expected {budgets[b]}")
            is_visual = torch.zeros(cur["valid"].shape[1], dtype=torch.bool)
            is_visual[cur["visual_rows"][b]] = True
            keep_vis = cur["visual_rows"][b][c]
            rows = torch.sort(torch.cat([torch.nonzero(cur["valid"][b] & ~is_visual).flatten(), keep_vis])).values
            local_rows.append(rows)
            vis_rows.append(torch.searchsorted(rows, keep_vis))
            text_rows.append(torch.searchsorted(rows, cur["text_rows"][b]))
            vis_ids.append(cur["visual_ids"][b][c])
        local, valid = _repad(local_rows)
        offsets = [local.shape[1] - len(r) for r in local_rows]
        cur["visual_rows"] = [o + r for o, r in zip(offsets, vis_rows)]
        cur["text_rows"] = [o + r for o, r in zip(offsets, text_rows)]
        cur["visual_ids"] = vis_ids
        cur["index"] = torch.gather(cur["index"], 1, local)
        cur["valid"] = valid
        state.stage_keep.append([v.clone() for v in vis_ids])
        state.keep = state.stage_keep[-1]
        if vlm.active_residuals is not None:  # DeepStack rows (Qwen3-VL) follow the kept rows
            vlm.active_residuals.reindex(local, valid)
        state.per_stage.append((cur["index"], valid))
        if rotary is not None:
            state.compact.append((valid.long().cumsum(1) - 1).clamp(min=0))
        state.all_valid.append(bool(valid.all()))
        state.index, state.valid = cur["index"], valid
        return local

    def prune(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        prefill = kwargs["position_embeddings"][0].shape[-2] == full_len and full_len > 1
        if module is layers[0]:
            flags["prefill"] = prefill
        i = layer_ids[id(module)]
        if i in stage_at:
            s = stage_at[i]
            if prefill:
                local = choose(s, hidden, kwargs["position_embeddings"])
                if stop_after_first:
                    raise _Stop
                hidden = _gather_rows(hidden, local)
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            elif s == 0 and state.per_stage:
                state.steps += 1
        s = stage_of[i]
        if s < 0 or len(state.per_stage) <= s:
            return (args, kwargs) if i in stage_at and prefill else None
        implementation = getattr(module.self_attn.config, "_attn_implementation", None) or "sdpa"
        return args, _restrict(kwargs, s, state, full_len, prefill, hidden.dtype, module_device(module),
                               implementation, rotary)

    layer_ids = {id(m): i for i, m in enumerate(layers)}
    try:
        if capture_previous:
            for k in ks:
                attn = layers[k - 1].self_attn
                handles.append(attn.q_proj.register_forward_hook(capture(k - 1, "q", last_only=True)))
                handles.append(attn.k_proj.register_forward_hook(capture(k - 1, "k", last_only=False)))
                handles.append(attn.register_forward_pre_hook(capture_rope(k - 1), with_kwargs=True))
        for decoder_layer in layers:
            handles.append(decoder_layer.register_forward_pre_hook(prune, with_kwargs=True))
        for decoder_layer in layers:  # registered last: counts the (already restricted) input
            handles.append(decoder_layer.register_forward_pre_hook(count, with_kwargs=True))
        yield state
    finally:
        for h in handles:
            h.remove()


def _text_after(prompt: Prompt) -> Tensor:
    """Sequence indices of the non-visual tokens after the prompt's last visual token (instruction + template)."""
    last = int(prompt.visual_pos.max())
    return torch.arange(last + 1, prompt.length)


@dataclass
class InLLMResult(GenerationResult):
    """A GenerationResult plus what an in-LLM pruner kept: ``keep`` the visual tokens of the last stage
    (``visual_tokens`` counts them), ``layer_tokens`` the prompt tokens each layer processes and
    ``visual_per_layer`` the visual tokens each layer keeps (for the FLOPs of Eq. 4, layer by layer)."""

    keep: Tensor | None = field(default=None, repr=False)
    layer_tokens: list[int] = field(default_factory=list)
    visual_per_layer: list[int] = field(default_factory=list)


def generate_inllm(vlm: VLM, prompt: Prompt | list[Prompt], stages: Sequence[Stage], max_new_tokens: int, *,
                   capture_previous: bool = False, result_cls: type[InLLMResult] = InLLMResult,
                   positions: str = "original", **kwargs: Any) -> InLLMResult | list[InLLMResult]:
    """Greedy generation pruning at every stage (prefill and the KV cache of the pruned layers).

    A list of prompts runs as one left-padded batch (ragged after pruning: re-padded at every stage).
    ``positions``: see ``inllm_hooks``.
    """
    single = isinstance(prompt, Prompt)
    prompts = [prompt] if single else list(prompt)
    with inllm_hooks(vlm, prompts, stages, capture_previous=capture_previous, positions=positions) as state:
        outs = vlm.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
    n_layers = len(vlm.language_model.layers)
    results = []
    for b, (p, out) in enumerate(zip(prompts, outs)):
        per_layer = state.visual_per_layer(b, p.num_visual, stages, n_layers)
        text = p.length - p.num_visual
        keep = state.keep[b]
        results.append(result_cls(
            text=out.text, token_ids=out.token_ids, prompt_tokens=text + len(keep), visual_tokens=len(keep),
            logits=out.logits, keep=keep, layer_tokens=[text + n for n in per_layer], visual_per_layer=per_layer))
    return results[0] if single else results


class SetInLLM:
    """Mixin for in-LLM pruners that choose a set at their stages rather than rank by one score (PyramidDrop,
    DART): ``keep`` is the last stage's set, found by one greedy step of ``generate``. A subclass defines
    ``schedule(num_layers, ratio) -> list[Stage]`` (the stages it runs on a ``num_layers``-layer LLM; no
    model needed), from which ``tokens_per_layer`` counts its cost, or overrides ``tokens_per_layer`` itself
    (PyramidDrop and DART do, from their ``plan`` / budget functions, tested against a real run's counts)."""

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        """The visual tokens left after the last stage (runs one greedy step)."""
        return self.generate(vlm, prompt, ratio, max_new_tokens=1).keep  # type: ignore[attr-defined]

    def tokens_per_layer(self, n_visual: int, ratio: float, num_layers: int) -> list[int]:
        """Visual tokens of each layer under the method's ``schedule(num_layers, ratio)`` (its stages)."""
        return stage_tokens(self.schedule(num_layers, ratio), n_visual, num_layers)  # type: ignore[attr-defined]


def top_k(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` largest ``scores`` (float32 topk, as the shared ``select``)."""
    return torch.sort(torch.topk(scores.float(), k, sorted=False).indices).values
