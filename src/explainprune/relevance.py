"""Relevance of each visual token to the model's answer: Eq. 1 of the paper (Section 3.2), made lean.

Eq. 1 folds, for answer token y_t, R_t = I then R_t <- R_t + M_l R_t for l = 0 .. L-1 with
M_l = E_h(A^l ⊙ ∇A^l) (``rule="grad"``; ``clamp`` keeps the positive part before the head mean) or
M_l = E_h(A^l) (``rule="mean"``, Table 4's ablation). Only the row of the position p_t that predicts
y_t is read, at the visual columns. That row is

    e_p^T (I + M_{L-1}) ... (I + M_1)(I + M_0),

so a row vector v = e_p folded v <- v + v M_l from the LAST layer down to the first gives it exactly:
no n x n matrix R is ever built, and layer l is needed only when backward reaches it. The engine
therefore runs one no-grad forward that stores each decoder layer's input, then walks down the layers:
recompute layer l with eager attention (A^l captured by a hook), backpropagate each answer token's
output gradient through that one layer (reusing its graph; optionally batched with
``is_grads_batched``), fold each token's row with A^l ⊙ ∇A^l as the gradient appears, pass the input
gradients on and free the layer. Peak memory is about four of one layer's attention maps, independent
of the number of layers (docs/relevance.md has the measurements).

``head_chunk=c`` makes the maps a few heads at a time instead (``attention.head_chunked_attention``: a
registered attention function with the eager masks and arithmetic). The recording forward computes
attention c heads at a time; each layer is recomputed once with its attention core cut out of the graph
(q, k, v after RoPE kept, the core's output O a leaf), one backward per token gives d/dO and the
residual/MLP part of d/dhidden; then per chunk of heads the chunk's maps are rebuilt from q, k, v, each
token's d/dO is backpropagated through them (∇A for the fold, d/dq, d/dk, d/dv accumulated), and
finally d/d(q, k, v) goes back through RoPE, the projections and the input norm. Only c heads' n x n
maps are alive at once (plus the shared n x n mask); it costs one extra attention forward per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from explainprune.attention import (
    _Stop,
    eager_attention,
    head_chunk_handler,
    head_chunked_attention,
    head_chunked_output,
    head_maps,
    hooks,
    module_device,
)
from explainprune.memory import relevance_head_chunk
from explainprune.models.base import VLM, Prompt

RULES = ("grad", "mean")


@dataclass
class RelevanceResult:
    """R_v for one prompt and answer.

    scores        Tensor[N_v]     R_v: mean over answer tokens of each token's relevance row (Eq. 1)
    token_scores  Tensor[T, N_v]  per answer token y_t
    answer_ids    list[int]       the T answer tokens explained (teacher-forced)
    maps          Tensor[T, n] or None  the whole relevance row of each token over the teacher-forced
                                  sequence (prompt + answer[:-1]), with ``keep_maps=True``
    """

    scores: Tensor
    token_scores: Tensor
    answer_ids: list[int]
    answer: str
    rule: str
    clamp: bool
    maps: Tensor | None = field(default=None, repr=False)
    head_chunk: int | None = None  # heads per chunk the run used (None: all at once)

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist(), "token_scores": self.token_scores.tolist(),
                "answer_ids": list(self.answer_ids), "answer": self.answer, "rule": self.rule,
                "clamp": self.clamp}


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown relevance rule {rule!r}; accepted: {', '.join(repr(r) for r in RULES)} "
                         "('grad' = Eq. 1 gradient-weighted, 'mean' = plain head mean, Table 4)")
    return rule


def answer_ids(vlm: VLM, prompt: Prompt, answer: str | list[int] | Tensor | None = None,
               max_new_tokens: int = 16) -> list[int]:
    """Token ids of ``answer``: a string (tokenized, no special tokens), ids, or None (greedy generation).

    A generated answer loses its trailing end-of-sequence tokens unless that would leave nothing.
    """
    if answer is None:
        ids = list(vlm.generate(prompt, max_new_tokens=max_new_tokens).token_ids)
        eos = set(vlm.eos_token_ids)
        while len(ids) > 1 and ids[-1] in eos:
            ids.pop()
    elif isinstance(answer, str):
        ids = vlm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(i) for i in torch.as_tensor(answer).flatten().tolist()]
    if not ids:
        raise ValueError(f"the answer {answer!r} has no tokens to explain")
    return ids


def teacher_forced(vlm: VLM, prompt: Prompt, ids: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The prompt followed by answer[:-1] as one sequence, and the row predicting each answer token.

    Returns inputs_embeds [1, n, D], position_ids [3, 1, n] or [1, n] (answer tokens continue after the
    prompt's last position, as generation does), attention_mask [1, n], rows LongTensor[T] (p_t = L-1+t).
    """
    embed = vlm.model.get_input_embeddings()
    dev = module_device(embed)
    extra = torch.tensor([ids[:-1]], dtype=torch.long, device=dev)
    embeds = prompt.inputs_embeds.to(dev)
    with torch.no_grad():
        embeds = torch.cat([embeds, embed(extra).to(embeds.dtype)], 1)
    pos = prompt.position_ids.to(dev)
    steps = torch.arange(1, len(ids), device=dev)
    pos = torch.cat([pos, pos[..., -1:] + steps], -1)
    mask = torch.cat([prompt.attention_mask.to(dev), torch.ones_like(extra)], 1)
    rows = torch.arange(len(ids)) + prompt.length - 1
    return embeds, pos, mask, rows


def _record(vlm: VLM, embeds: Tensor, pos: Tensor, mask: Tensor, prompt: Prompt | None = None) -> tuple[list, Tensor]:
    """One no-grad forward: each decoder layer's (args, kwargs) and the final hidden state before the norm.
    ``prompt`` (the one ``embeds`` starts with) brings its ``visual_residuals`` (Qwen3-VL DeepStack): they are
    in the recorded inputs of the later layers; being constants, they change no gradient of Eq. 1."""
    lm = vlm.language_model
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    final: list[Tensor] = []

    def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((args, kwargs))

    def stop(module: Any, args: tuple[Any, ...]) -> None:
        final.append(args[0])
        raise _Stop  # the LM head over all n positions is not needed

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in lm.layers]
    handles.append(lm.norm.register_forward_pre_hook(stop))
    with hooks(*handles), torch.no_grad():
        try:
            vlm.forward(embeds, pos, mask, prompt=prompt, use_cache=False)
        except _Stop:
            pass
    if len(inputs) != len(lm.layers) or not final:  # pragma: no cover - defensive
        raise RuntimeError("the forward did not pass through every decoder layer and the final norm")
    return inputs, final[0]


def _run_layer(layer: Any, hidden: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """Layer output [1, n, D] and its attention map A [1, H, n, n] (eager, captured from self_attn)."""
    seen: list[Tensor] = []

    def grab(module: Any, inp: Any, out: Any) -> None:
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise RuntimeError("the attention layer returned no attention weights (is it eager?)")
        seen.append(out[1])

    with hooks(layer.self_attn.register_forward_hook(grab)):
        out = _call_layer(layer, hidden, args, kwargs)
    return out, seen[0]


def _call_layer(layer: Any, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
    out = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def _fold(v: Tensor, attn: Tensor, grad: Tensor | None = None, clamp: bool = True) -> Tensor:
    """One step of the reverse fold, v <- v + v M_l (Eq. 1), one head at a time (temporaries n x n).

    v [T, n] rows; attn A^l [H, n, n]; grad ∇A^l per row [T, H, n, n] (rule "grad") or None ("mean").
    M_l = E_h(A ⊙ ∇A) (positive part first when ``clamp``) or E_h(A).
    """
    acc = torch.zeros_like(v)
    _fold_heads(acc, v, attn, grad, clamp)
    return v + acc / attn.shape[0]


def _sweep_layer(out: Tensor, hidden: Tensor, attn: Tensor, grads: Tensor, v: Tensor, clamp: bool,
                 batch_bytes: int) -> Tensor:
    """Backpropagate every answer token's output gradient through one recomputed layer; fold its rows.

    out [1, n, D] = layer(hidden); attn A^l [1, H, n, n] (in the graph); grads [T, 1, n, D] = d logit_t /
    d out; v [T, n] is folded in place. Returns d logit_t / d hidden, [T, 1, n, D]. One token at a time,
    ∇A^l is consumed by a tensor hook as backward produces it (never returned, so it is freed once the
    softmax backward has used it); tokens whose ∇A^l fit ``batch_bytes`` together go through one batched
    vector-Jacobian product (``is_grads_batched``) instead.
    """
    t_count = grads.shape[0]
    chunk = max(1, min(t_count, batch_bytes // max(1, attn.numel() * attn.element_size())))
    a = attn.detach()[0]
    grads = grads.to(out.device)  # sharded model: the layer above may live on another device
    below = torch.empty_like(grads, device=hidden.device)
    for c0 in range(0, t_count, chunk):
        c1 = min(t_count, c0 + chunk)
        keep_graph = c1 < t_count
        if c1 - c0 == 1:
            def fold(g: Tensor, t: int = c0) -> None:
                v[t:t + 1] = _fold(v[t:t + 1], a, g, clamp)

            with hooks(attn.register_hook(fold)):
                (below[c0],) = torch.autograd.grad(out, hidden, grads[c0], retain_graph=keep_graph)
        else:
            g_h, g_a = torch.autograd.grad(out, (hidden, attn), grads[c0:c1], retain_graph=keep_graph,
                                           is_grads_batched=True)
            below[c0:c1] = g_h
            v[c0:c1] = _fold(v[c0:c1], a, g_a[:, 0], clamp)
            del g_a
    return below


def _fold_heads(acc: Tensor, v: Tensor, attn: Tensor, grad: Tensor | None, clamp: bool) -> None:
    """The head sum of ``_fold`` for some (or all) heads, added into ``acc`` [T, n], one head at a time.

    v [T, n]; attn [c, n, n] (these heads' maps); grad [T, c, n, n] (rule "grad") or None ("mean").
    """
    for h in range(attn.shape[0]):
        a = attn[h].float()
        if grad is None:
            acc += v @ a
            continue
        cam = grad[:, h].float() * a  # [T, n, n]
        if clamp:
            cam.clamp_(min=0)
        acc += torch.bmm(v[:, None, :], cam)[:, 0]


def _mean_layer_heads(layer: Any, hidden: Tensor, args: tuple, kwargs: dict, v: Tensor, chunk: int) -> Tensor:
    """Rule "mean" with ``head_chunk``: v + v E_h(A^l), the maps made ``chunk`` heads at a time."""
    acc = torch.zeros_like(v)
    heads: list[int] = []

    def fold(module: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        heads.append(query.shape[1])
        for h0 in range(0, query.shape[1], chunk):
            h1 = min(query.shape[1], h0 + chunk)
            _fold_heads(acc, v, head_maps(module, query, key, mask, scaling, h0, h1)[0], None, False)
        raise _Stop  # the rest of the layer is not needed

    with head_chunk_handler(fold), torch.no_grad():
        try:
            _call_layer(layer, hidden, args, kwargs)
        except _Stop:
            pass
    if not heads:  # pragma: no cover - defensive
        raise RuntimeError("the decoder layer never called its attention")
    return v + acc / heads[0]


def _sweep_layer_heads(layer: Any, hidden: Tensor, args: tuple, kwargs: dict, grads: Tensor, v: Tensor,
                       clamp: bool, chunk: int) -> Tensor:
    """``_sweep_layer`` with only ``chunk`` heads' attention maps alive at a time; v [T, n] folded in place.

    The layer runs once with gradients, its attention core (softmax(q k^T) v, all heads) computed
    without a graph and handed on as a leaf O (q, k, v after RoPE stay in the graph). Per answer token
    t, one backward gives d logit_t / d O and the part of d logit_t / d hidden that bypasses the core
    (residual, MLP). Then, a chunk of heads at a time, the chunk's maps are recomputed from the detached
    q, k, v (``head_maps``: the eager arithmetic) and each token's d/dO is backpropagated through them:
    ∇A for the fold, d/dq, d/dk, d/dv accumulated per token. Last, per token, d/d(q, k, v) goes back
    through RoPE, the projections and the input norm to hidden. Returns d logit_t / d hidden [T, 1, n, D].
    """
    seen: dict[str, Any] = {}

    def capture(module: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                scaling: float) -> Tensor:
        with torch.no_grad():
            core = head_chunked_output(module, query, key, value, mask, scaling, chunk)
        seen.update(module=module, q=query, k=key, v=value, mask=mask, scaling=scaling,
                    o=core.requires_grad_(True))
        return seen["o"]

    hidden = hidden.detach().requires_grad_(True)
    with head_chunk_handler(capture), torch.enable_grad():
        out = _call_layer(layer, hidden, args, kwargs)
    module, q, k, val, o = seen["module"], seen["q"], seen["k"], seen["v"], seen["o"]
    t_count, heads = grads.shape[0], q.shape[1]
    grads = grads.to(out.device)  # sharded model: the layer above may live on another device
    below = torch.empty_like(grads, device=hidden.device)
    d_o = torch.empty((t_count, *o.shape), dtype=o.dtype, device=o.device)  # [T, 1, n, H, hd]
    for t in range(t_count):
        below[t], d_o[t] = torch.autograd.grad(out, (hidden, o), grads[t], retain_graph=True)
    mask, scaling = seen["mask"], seen["scaling"]
    del out, o  # the MLP's graph goes; q, k, v keep theirs (back to hidden)
    seen.clear()

    # leaves for the chunks: grads come back full-size ([1, H or H_kv, n, hd], zero outside the chunk)
    q_leaf, k_leaf, v_leaf = (x.detach().requires_grad_(True) for x in (q, k, val))
    d_q, d_k, d_v = (torch.zeros((t_count, *x.shape), dtype=x.dtype, device=x.device) for x in (q, k, val))
    kv = torch.arange(heads, device=q.device) // module.num_key_value_groups
    acc = torch.zeros_like(v)
    for h0 in range(0, heads, chunk):
        h1 = min(heads, h0 + chunk)
        with torch.enable_grad():
            a_c = head_maps(module, q_leaf, k_leaf, mask, scaling, h0, h1)  # [1, c, n, n]
            o_c = torch.matmul(a_c, v_leaf[:, kv[h0:h1]])  # [1, c, n, hd]
        for t in range(t_count):
            g_q, g_k, g_v, g_a = torch.autograd.grad(o_c, (q_leaf, k_leaf, v_leaf, a_c),
                                                     d_o[t][:, :, h0:h1].transpose(1, 2),
                                                     retain_graph=t < t_count - 1)
            d_q[t] += g_q
            d_k[t] += g_k
            d_v[t] += g_v
            _fold_heads(acc[t:t + 1], v[t:t + 1], a_c.detach()[0], g_a, clamp)
            del g_a
        del a_c, o_c
    for t in range(t_count):
        (g_h,) = torch.autograd.grad((q, k, val), hidden, (d_q[t], d_k[t], d_v[t]), retain_graph=t < t_count - 1)
        below[t] += g_h
    v += acc / heads
    return below


def relevance(vlm: VLM, prompt: Prompt, answer: str | list[int] | Tensor | None = None, rule: str = "grad",
              clamp: bool = True, keep_maps: bool = False, max_new_tokens: int = 16,
              batch_bytes: int = 0, progress: bool = False, head_chunk: int | None = None) -> RelevanceResult:
    """R_v (Eq. 1, Section 3.2) of ``prompt``'s visual tokens for ``answer``.

    answer: a string, token ids, or None (generate greedily, up to ``max_new_tokens``).
    rule: "grad" (E_h(A ⊙ ∇A), the paper) or "mean" (E_h(A), Table 4). clamp: positive part of A ⊙ ∇A
    before the head mean (True) or Eq. 1 as printed (False). Answer tokens are backpropagated one at a
    time through each recomputed layer, reusing its graph (each ∇A^l consumed by a hook: the lowest
    memory, and on CPU the fastest); tokens whose ∇A^l fit in ``batch_bytes`` together (0 = never, the
    default) go through one batched vector-Jacobian product instead.
    head_chunk: an int c recomputes each layer's maps c heads at a time (the recording forward too), so
    the peak holds c maps instead of H (same numbers to float rounding; ``batch_bytes`` does not apply).
    Implemented for the Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL attention (the four families);
    NotImplementedError elsewhere. None (default) chooses: all H heads' n x n maps at once (eager
    attention) when one layer's maps fit in the free memory of the layers' devices, else the largest
    chunk that fits (``memory.auto_head_chunk``; the result's ``head_chunk`` says which ran).
    progress: a progress bar over the layers (stderr). Returns a RelevanceResult with ``scores``
    Tensor[N_v] (float32, on CPU).
    """
    check_rule(rule)
    if prompt.num_visual == 0:
        raise ValueError("the prompt has no visual tokens: give an image or a video")
    ids = answer_ids(vlm, prompt, answer, max_new_tokens)
    embeds, pos, mask, rows = teacher_forced(vlm, prompt, ids)
    lm = vlm.language_model
    n, t_count = embeds.shape[1], len(ids)
    dev = embeds.device
    v = torch.zeros(t_count, n, device=dev)
    v[torch.arange(t_count), rows.to(dev)] = 1.0  # e_{p_t}^T

    if head_chunk is not None and (isinstance(head_chunk, bool) or int(head_chunk) != head_chunk
                                   or head_chunk < 1):
        raise ValueError(f"head_chunk must be None or a positive number of heads, got {head_chunk!r}")
    if head_chunk is None:
        head_chunk = relevance_head_chunk(vlm, n)
    switch = eager_attention(vlm) if head_chunk is None else head_chunked_attention(vlm, int(head_chunk))
    with switch:
        inputs, final = _record(vlm, embeds, pos, mask, prompt)
        if rule == "grad":
            grads = _output_grads(vlm, final, rows, ids)  # [T, 1, n, D]: d logit_t / d h_L
        sweep = reversed(range(len(lm.layers)))
        if progress:
            from tqdm.auto import tqdm

            sweep = tqdm(sweep, total=len(lm.layers), desc="relevance, last layer to first", unit="layer")
        for layer_index in sweep:
            args, kwargs = inputs.pop()
            hidden = args[0] if args else kwargs["hidden_states"]
            layer = lm.layers[layer_index]
            v = v.to(module_device(layer))  # sharded model (device_map): fold on the layer's own device
            if head_chunk is not None:
                if rule == "mean":
                    v = _mean_layer_heads(layer, hidden, args, kwargs, v, int(head_chunk))
                else:
                    grads = _sweep_layer_heads(layer, hidden, args, kwargs, grads, v, clamp, int(head_chunk))
            elif rule == "mean":
                with torch.no_grad():
                    _, attn = _run_layer(layer, hidden, args, kwargs)
                    v = _fold(v, attn[0])
                del attn
            else:
                hidden = hidden.detach().requires_grad_(True)
                with torch.enable_grad():
                    out, attn = _run_layer(layer, hidden, args, kwargs)
                grads = _sweep_layer(out, hidden, attn, grads, v, clamp, batch_bytes)
                del out, attn
            del hidden, args, kwargs
    maps = v.detach().cpu()
    token_scores = maps[:, prompt.visual_pos]
    return RelevanceResult(scores=token_scores.mean(0), token_scores=token_scores, answer_ids=ids,
                           answer=vlm.tokenizer.decode(ids, skip_special_tokens=True).strip(), rule=rule,
                           clamp=clamp, maps=maps if keep_maps else None,
                           head_chunk=None if head_chunk is None else int(head_chunk))


def _output_grads(vlm: VLM, final: Tensor, rows: Tensor, ids: list[int]) -> Tensor:
    """d logit(y_t at row p_t) / d h_L for every t, as Tensor[T, 1, n, D] (one non-zero row each)."""
    lm = vlm.language_model
    head = vlm.model.get_output_embeddings()
    h = final.detach().requires_grad_(True)
    idx = rows.to(h.device)
    with torch.enable_grad():
        logits = head(lm.norm(h[:, idx]))[0]  # [T, V]
        picked = logits[torch.arange(len(ids), device=logits.device), torch.tensor(ids, device=logits.device)]
        (g,) = torch.autograd.grad(picked.sum(), h)  # rows are independent (norm and head are per position)
    out = torch.zeros(len(ids), *h.shape, dtype=h.dtype, device=h.device)
    out[torch.arange(len(ids)), 0, idx] = g[0, idx]
    return out

