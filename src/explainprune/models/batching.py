"""Batching of prepared prompts for the shared generate / forward: each prompt's kept rows gathered and
left-padded into one batch (embeddings, ids, positions, mask), and Qwen3-VL's DeepStack residuals applied at
the kept visual rows of such a batch (``VisualResiduals``).

It imports nothing from ``models.base`` (which imports it): a prompt here is anything with the fields of
``Prompt`` it reads (``PromptRows``)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class PromptRows(Protocol):
    """What batching reads of a ``models.base.Prompt`` (shapes there)."""

    input_ids: Tensor
    inputs_embeds: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    visual_pos: Tensor
    visual_residuals: dict[int, Tensor]

    @property
    def num_visual(self) -> int: ...

    @property
    def length(self) -> int: ...

    def kept_positions(self, keep: Tensor | None) -> Tensor: ...



def kept_rows(prompts: list[PromptRows], keeps: list[Tensor | None]) -> list[Tensor]:
    """Each prompt's kept sequence indices (``Prompt.kept_positions``): what ``pad_left``, ``pad_left_ids``
    and ``visual_targets`` gather; compute it once per batch and pass it as their ``rows``."""
    return [p.kept_positions(k) for p, k in zip(prompts, keeps, strict=True)]


def visual_targets(prompts: list[PromptRows], keeps: list[Tensor | None], length: int | None = None,
                   rows: list[Tensor] | None = None) -> Tensor:
    """LongTensor[B, L]: for each row of the batch ``pad_left`` builds, the index (into 0..N_v-1) of the
    visual token it holds, -1 for text and padding. ``length`` > the batch length right-extends with -1
    (a prompt followed by answer tokens, as the relevance engine runs it). ``rows``: ``kept_rows``' result."""
    rows = kept_rows(prompts, keeps) if rows is None else rows
    longest = max(len(r) for r in rows)
    out = torch.full((len(prompts), max(longest, length or 0)), -1, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        index = torch.full((p.length,), -1, dtype=torch.long)
        index[p.visual_pos] = torch.arange(p.num_visual)
        out[b, longest - len(r): longest] = index[r]
    return out


class VisualResiduals:
    """The active ``Prompt.visual_residuals`` of one forward / generate: forward hooks on the decoder layers
    that add each prompt's tensors at the rows holding its (kept) visual tokens during prefill.

    ``targets`` LongTensor[B, L] (``visual_targets``); a call whose sequence length is not L (a decode step)
    is left alone. A method that drops rows inside the LLM calls ``reindex`` so later layers follow it.
    """

    def __init__(self, layers: Any, prompts: list[PromptRows], targets: Tensor):
        self.targets = targets
        self.feats = {l: [p.visual_residuals[l] for p in prompts] for l in sorted(prompts[0].visual_residuals)}
        self.handles = [layers[l].register_forward_hook(self._hook(l)) for l in self.feats]

    def reindex(self, index: Tensor, valid: Tensor | None = None) -> None:
        """Rows of later layers are rows ``index`` [B, L'] of the current ones (``valid`` False: padding)."""
        t = torch.gather(self.targets.expand(index.shape[0], -1), 1, index.cpu())
        self.targets = t if valid is None else t.masked_fill(~valid.cpu(), -1)

    def _hook(self, layer: int):
        def add(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != self.targets.shape[1]:
                return None
            hidden = hidden.clone()
            for b, feats in enumerate(self.feats[layer]):
                rows = torch.nonzero(self.targets[b] >= 0).flatten()
                if rows.numel():
                    add = feats[self.targets[b, rows].to(feats.device)].to(hidden.device, hidden.dtype)
                    rows = rows.to(hidden.device)
                    hidden[b, rows] = hidden[b, rows] + add
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return add

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pad_left(prompts: list[PromptRows], keeps: list[Tensor | None],
             rows: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gather each prompt's kept rows and left-pad them into one batch.

    Returns inputs_embeds [B, L, D], attention_mask [B, L] (0 on padding) and position_ids [3, B, L] or
    [B, L] holding each kept token's original position (padding gets position 0; it is masked out).
    ``rows``: ``kept_rows(prompts, keeps)`` when the caller has it already.
    """
    rows = kept_rows(prompts, keeps) if rows is None else rows
    longest = max(len(r) for r in rows)
    first = prompts[0]
    d = first.inputs_embeds.shape[-1]
    mrope = first.position_ids.dim() == 3
    embeds = first.inputs_embeds.new_zeros(len(prompts), longest, d)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    if mrope:
        pos = torch.zeros(first.position_ids.shape[0], len(prompts), longest, dtype=torch.long)
    else:
        pos = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        start = longest - len(r)
        embeds[b, start:] = p.inputs_embeds[0, r]
        mask[b, start:] = p.attention_mask[0, r]
        if mrope:
            pos[:, b, start:] = p.position_ids[:, 0, r]
        else:
            pos[b, start:] = p.position_ids[0, r]
    return embeds, mask, pos


def pad_left_ids(prompts: list[PromptRows], keeps: list[Tensor | None], pad_id: int,
                 rows: list[Tensor] | None = None) -> Tensor:
    """The kept tokens' ids, left-padded with ``pad_id`` as ``pad_left`` pads the embeddings: LongTensor[B, L]."""
    rows = kept_rows(prompts, keeps) if rows is None else rows
    kept = [p.input_ids[0, r] for p, r in zip(prompts, rows, strict=True)]
    ids = torch.full((len(kept), max(len(r) for r in kept)), int(pad_id), dtype=torch.long)
    for b, r in enumerate(kept):
        ids[b, ids.shape[1] - len(r):] = r
    return ids
