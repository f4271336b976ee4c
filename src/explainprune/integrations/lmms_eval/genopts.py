"""A task's ``generation_kwargs`` (lmms-eval) -> ``VLM.generate`` options.

Every decoding setting of transformers' ``generate`` that works on a pruned, left-padded batch is passed on
(``HONOURED``: sampling, penalties, token bans, length and time limits). ``until`` and ``max_new_tokens`` are
handled here; ``temperature: 0`` means greedy (lmms-eval's convention), and under greedy decoding the
sampling-only settings (``SAMPLING_ONLY``) have no effect and are dropped. Anything else (beam search,
extra returned sequences, lmms-eval model-specific keys such as ``image_aspect_ratio``) is NOT applied and
listed in ``GenOptions.ignored`` with the reason, for one warning line per run and setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
HONOURED = (*SAMPLING_ONLY, "do_sample", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
            "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "min_new_tokens",
            "exponential_decay_length_penalty", "renormalize_logits", "remove_invalid_values", "max_time",
            "forced_eos_token_id", "length_penalty")
# set by explainprune itself (the stop ids and padding of the checkpoint, the returned structure)
CONTROLLED = ("pad_token_id", "eos_token_id", "bos_token_id", "return_dict_in_generate", "output_scores",
              "output_logits", "output_attentions", "output_hidden_states", "max_length", "min_length", "use_cache")


@dataclass(frozen=True)
class GenOptions:
    """A task's generation kwargs, resolved: ``generate`` keyword options, the stop strings, and the settings
    not applied (``ignored``: "name=value (why)")."""

    max_new_tokens: int
    until: tuple[str, ...] = ()
    generate: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def _why(key: str, value: Any) -> str | None:
    """Why ``key=value`` is not applied (None: it is)."""
    if key == "num_beams":
        return None if int(value or 1) == 1 else "beam search is not run on pruned prompts; decoding greedily"
    if key == "num_return_sequences":
        return None if int(value or 1) == 1 else "one answer per request"
    if key in CONTROLLED:
        return "set by explainprune"
    if key in HONOURED:
        return None
    return "not a generate option"


def generation_options(gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int = 16) -> GenOptions:
    """``max_new_tokens``, ``until`` (str or list), ``temperature`` (0 = greedy), ``do_sample`` and every other
    setting in ``HONOURED``; the rest in ``ignored`` (sorted)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"generation kwarg 'until' must be a string or a list of strings; got {until!r}")
    max_new = int(kw.pop("max_new_tokens", default_max_new_tokens) or default_max_new_tokens)
    temperature = kw.get("temperature")
    temperature = float(temperature) if temperature is not None else None
    do_sample = bool(kw.get("do_sample", False)) or (temperature is not None and temperature > 0)
    if temperature == 0:  # lmms-eval's greedy
        do_sample = False
    ignored, options = [], {}
    for key in sorted(kw):
        value = kw[key]
        why = _why(key, value)
        if why is not None:
            ignored.append(f"{key}={value!r} ({why})")
        elif key in ("num_beams", "num_return_sequences", "do_sample"):
            continue
        elif key in SAMPLING_ONLY and not do_sample:
            continue  # no effect on greedy decoding
        elif value is not None:
            options[key] = value
    if do_sample:
        options["do_sample"] = True
    return GenOptions(max_new, tuple(str(u) for u in until), options, tuple(ignored))


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string, stripped."""
    stop = min((text.index(u) for u in until if u and u in text), default=len(text))
    return text[:stop].strip()
