"""The pruner protocol, the shared top-k selection and the method registry.

A pruner gives every visual token a score (higher = keep); the shared `select` keeps the top
``ceil(ratio * N_v)``. A pruner that prunes inside the LLM (FastV) declares the layer it prunes at in
``layer``; pruners that act before the LLM have ``layer = 0``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from explainprune.cost import LLMShape, kept_count, visual_tokens_per_layer
from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.validation import as_ratio as _as_ratio  # noqa: F401  (re-exported: evs, downsample)

_REGISTRY: dict[str, type[Pruner]] = {}


def select(scores: Tensor, ratio: float, num_visual: int | None = None) -> Tensor:
    """Sorted indices of the top ``ceil(ratio * N_v)`` scores (at least 1), a CPU LongTensor.

    scores: Tensor[N_v], on any device (top-k runs there). ``num_visual`` (optional) is the prompt's
    N_v, checked against the scores.
    Raises ValueError for a ratio outside (0, 1], a wrong length, NaN scores or no visual tokens.
    ``ratio`` may be a Python number, a numpy scalar or a 0-d tensor.
    """
    ratio = _as_ratio(ratio)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be a number in (0, 1] (the share of visual tokens kept); got {ratio!r}")
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [N_v]; got shape {tuple(scores.shape)}")
    n = scores.numel()
    if n == 0:
        raise ValueError("the prompt has no visual tokens: nothing to select (give an image or a video)")
    if num_visual is not None and n != num_visual:
        raise ValueError(f"scores has {n} entries but the prompt has {num_visual} visual tokens")
    if torch.isnan(scores).any():
        where = torch.nonzero(torch.isnan(scores)).flatten()[:8].tolist()
        raise ValueError(f"scores contain NaN (at visual tokens {where}); scores must be finite numbers")
    k = kept_count(n, float(ratio))
    top = torch.topk(scores.float(), k, sorted=False).indices
    return torch.sort(top).values.cpu()


def as_keep(keep: Tensor | Any | None, num_visual: int) -> Tensor | None:
    """``keep`` from a (custom) pruner, on any device or as a list, as the sorted CPU LongTensor[k] of
    distinct indices in 0..N_v-1 that ``VLM.generate`` takes (None, keep all, stays None)."""
    if keep is None:
        return None
    keep = torch.as_tensor(keep)
    if keep.dim() != 1 or keep.dtype == torch.bool or keep.is_floating_point() or keep.is_complex():
        raise ValueError(f"keep must be a 1-D tensor of integer indices into the {num_visual} visual tokens "
                         f"(not a mask or scores); got dtype {keep.dtype}, shape {tuple(keep.shape)}")
    keep = torch.unique(keep.to("cpu", torch.long))  # sorted, distinct
    if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= num_visual):
        raise ValueError(f"keep holds indices outside 0..{num_visual - 1}; got min {int(keep[0])}, "
                         f"max {int(keep[-1])}")
    return keep


def register(name: str):
    """Class decorator adding a pruner to the registry under ``name``."""

    def deco(cls: type[Pruner]) -> type[Pruner]:
        if name in _REGISTRY:
            raise ValueError(f"a pruner named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available(plugins: bool = True) -> list[str]:
    """The built-in methods and (unless ``plugins=False``) the installed plug-ins that load (entry-point group
    ``explainprune.pruners``; one that fails gives a warning naming its package)."""
    if not plugins:
        return sorted(_REGISTRY)
    from explainprune.plugins import load_all

    return sorted({*_REGISTRY, *load_all(set(_REGISTRY), Pruner)})


def get_pruner(name: str, **options: Any) -> Pruner:
    """The pruner registered as ``name`` (built in, or an installed plug-in), built with ``options``
    (e.g. ``seed=0``, ``layer=2``)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        from explainprune.plugins import find

        cls = find(name, set(_REGISTRY), Pruner)
    if cls is None:
        names = available()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown pruner {name!r}.{hint} available: {', '.join(names)}")
    _check_option_types(name, cls, options)
    try:
        return cls(**options)
    except TypeError as err:
        fields = [f for f in getattr(cls, "__dataclass_fields__", {})]
        raise ValueError(f"pruner {name!r} accepts options {fields}; got {sorted(options)} ({err})") from None


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_option_types(name: str, cls: type, options: dict[str, Any]) -> None:
    """Options declared ``int`` / ``float`` / ``bool`` / ``str`` on the pruner's dataclass must have that type
    (``fastv:layer=abc`` fails here, before any model work)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    for key, value in options.items():
        if key not in fields:
            continue
        kinds = _SIMPLE_TYPES.get(str(fields[key].type))
        if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ValueError(f"pruner {name!r}: option {key} must be {fields[key].type}; got {value!r}")


@dataclass
class Pruner:
    """Base class: subclasses implement ``score``; ``keep`` and ``generate`` are shared."""

    name: ClassVar[str] = ""
    layer: ClassVar[int] = 0  # LLM layer the pruning happens at; 0 = before the LLM
    # True when the kept count follows the media's layout (frames, grids), not the ratio alone: the cost
    # model's ``tokens_per_layer`` is then the nominal count; runs count what was kept (evs, downsample)
    count_from_media: ClassVar[bool] = False

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        """Sorted indices (into the prompt's visual tokens) that survive at ``ratio``."""
        if prompt.num_visual == 0:
            raise ValueError("the prompt has no visual tokens: nothing to prune (give an image or a video)")
        return select(self.score(vlm, prompt), ratio, prompt.num_visual)

    # -- cost (``explainprune.cost.method_account``: ``explainprune flops``, the runner, lmms-eval) -----------
    def tokens_per_layer(self, n_visual: int, ratio: float, num_layers: int) -> list[int]:
        """Visual tokens each of the ``num_layers`` LLM layers sees (prefill and KV cache) on an input of
        ``n_visual`` at ``ratio``: all of them before ``layer``, ``kept_count(n_visual, ratio)`` from it on
        (a pre-LLM pruner, ``layer`` 0, keeps that count in every layer). Multi-stage methods override it.
        Raises ValueError for an in-LLM ``layer`` outside 1..num_layers-1."""
        layer = int(self.layer)
        if layer != 0 and not 1 <= layer < num_layers:
            raise ValueError(f"{self.name or type(self).__name__} prunes at layer {layer}: it must be in "
                             f"1..{num_layers - 1} for a {num_layers}-layer LLM")
        return visual_tokens_per_layer(n_visual, kept_count(n_visual, ratio), layer, num_layers)

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """FLOPs the method spends choosing tokens, beyond Eq. 4's layers (hidden size ``d``; the visual
        tokens of each LLM layer). 0 unless a method says otherwise; the evaluation adds it to the total."""
        return 0

    def selection_flops(self, shape: LLMShape, n_visual: int, tokens_per_layer: list[int]) -> int:
        """The selection cost the cost model counts: ``overhead_flops(shape.hidden, ...)``; a method whose
        cost needs more of the model's shape than d (e.g. the vision head dim) overrides this instead."""
        return int(self.overhead_flops(shape.hidden, n_visual, tokens_per_layer))

    def generate(self, vlm: VLM, prompt: Prompt | list[Prompt], ratio: float, max_new_tokens: int = 16,
                 **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generate keeping ``self.keep(...)`` (any device; see ``as_keep``); a list of prompts runs as one
        left-padded (ragged) batch."""
        if isinstance(prompt, Prompt):
            keep = as_keep(self.keep(vlm, prompt, ratio), prompt.num_visual)
            return vlm.generate(prompt, keep=keep, max_new_tokens=max_new_tokens, **kwargs)
        prompts = list(prompt)
        keeps = [as_keep(self.keep(vlm, p, ratio), p.num_visual) for p in prompts]
        return vlm.generate(prompts, keep=keeps, max_new_tokens=max_new_tokens, **kwargs)
