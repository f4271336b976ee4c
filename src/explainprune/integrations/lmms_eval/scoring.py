"""Log-likelihood of a continuation under pruning (lmms-eval's ``loglikelihood`` requests).

The continuation's tokens are decoded, one by one, by the same ``generate`` call that answers a
``generate_until`` request, with a logits processor forcing each next token to be the continuation's
(``ForceTokens``, last in the processor list): the context is pruned exactly as for generation (the
in-LLM methods' hooks choose from the context's prefill and the continuation attends to the pruned KV
cache), and the RAW logits of every step (``output_logits``) give

    log p(continuation | context) = sum_t log_softmax(logits_t)[c_t],   greedy = all_t argmax(logits_t) == c_t.

The continuation is tokenized on its own (no special tokens) and placed right after the context's
generation prompt, where the answer's tokens go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scored:
    """log p(continuation | context) (sum over its tokens), whether greedy decoding gives it, its token count."""

    logprob: float
    greedy: bool
    tokens: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token: what lmms-eval's own models return (its multiple-choice
        scoring takes the argmin)."""
        return -self.logprob / self.tokens


class ForceTokens:
    """Logits processor for ONE ``generate`` call: at decoding step t, row b may only emit ``targets[b][t]``
    (then ``fill``, e.g. EOS, once the row's targets are used up). Step 0 is the first call."""

    def __init__(self, targets: list[list[int]], fill: int):
        self.targets, self.fill = targets, fill
        self.start: int | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        t = input_ids.shape[1] - self.start
        allowed = [row[t] if t < len(row) else self.fill for row in self.targets]
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(allowed)), torch.tensor(allowed, device=scores.device)] = 0.0
        return forced


def continuation_ids(tokenizer, text: str) -> list[int]:
    """The continuation's token ids (no special tokens added). ValueError for an empty continuation."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"the continuation {text!r} has no tokens: nothing to score")
    return ids


def score_logits(logits: Tensor, target: list[int]) -> Scored:
    """From raw step logits [>= T, vocab] (row t predicts token t) and the T target ids."""
    if logits is None or logits.shape[0] < len(target):
        got = 0 if logits is None else logits.shape[0]
        raise ValueError(f"decoding stopped after {got} of the continuation's {len(target)} tokens (the "
                         "continuation holds an end-of-sequence token before its end)")
    rows = logits[: len(target)].float()
    ids = torch.tensor(target, device=rows.device)
    logp = torch.log_softmax(rows, -1).gather(1, ids[:, None]).sum()
    return Scored(float(logp), bool((rows.argmax(-1) == ids).all()), len(target))


def check_eos(target: list[int], eos: list[int], text: str) -> None:
    """ValueError when an end-of-sequence id sits inside the continuation (decoding would stop there)."""
    inner = [t for t in target[:-1] if t in eos]
    if inner:
        raise ValueError(f"the continuation {text!r} holds the end-of-sequence token {inner[0]} before its end: "
                         "it cannot be scored by decoding")
