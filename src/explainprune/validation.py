"""Checks of inputs that would run but can never score: called before any model work where they can be.

  check_ratios         retention ratios in (0, 1], each given once (a repeated ratio counts every sample twice)
  check_pixel_options  --min-pixels / --max-pixels: positive, min <= max (no model needed)
  check_pixel_range    a loaded Qwen-style image processor: max_pixels at least one merged patch, min <= max
  check_prompt_length  a prompt no longer than the model's ``max_position_embeddings``
  prepare_sample       ``vlm.prepare`` for a sample, an InputError from it naming the sample
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from explainprune.errors import InputError


def as_ratio(ratio: Any) -> Any:
    """A plain float for numpy scalars and 0-d tensors (anything else is returned as is)."""
    import torch

    if isinstance(ratio, torch.Tensor) and ratio.dim() == 0 and not ratio.dtype == torch.bool:
        return float(ratio)
    if type(ratio).__module__ == "numpy" and getattr(ratio, "shape", None) == () and \
            getattr(getattr(ratio, "dtype", None), "kind", "") in "iuf":
        return float(ratio)
    return ratio


def check_ratios(ratios: Sequence[float], flag: str = "ratios") -> tuple[float, ...]:
    """``ratios`` as floats when each is a number in (0, 1] and none repeats; InputError otherwise."""
    if not ratios:
        raise InputError("give at least one retention ratio")
    seen: list[float] = []
    for r in map(as_ratio, ratios):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise InputError(f"{flag} must be in (0, 1] (the share of visual tokens kept); got {r!r}")
        if float(r) in seen:
            raise InputError(f"{flag}: {float(r):g} is given twice (every sample would be counted twice at it)",
                             hint="give each ratio once")
        seen.append(float(r))
    return tuple(seen)


def check_pixel_options(min_pixels: int | None, max_pixels: int | None) -> None:
    """--min-pixels / --max-pixels as given (None: the checkpoint's): positive integers, min <= max."""
    for flag, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{flag} must be a positive number of pixels; got {value!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise InputError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}",
                         hint="give min <= max (the range an image's area is resized into)")


def _edges(size: Any) -> tuple[int | None, int | None]:
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return get("shortest_edge"), get("longest_edge")


def check_pixel_range(processor: Any, family: str = "") -> None:
    """For an image processor that resizes to an area range (Qwen's ``size`` = {shortest_edge: min_pixels,
    longest_edge: max_pixels}, patches of ``patch_size``, merged ``merge_size`` x ``merge_size``): refuse
    min_pixels > max_pixels, and max_pixels below one merged patch ((patch_size * merge_size)^2 pixels),
    where every image becomes one visual token. Other processors (fixed sizes) are left alone."""
    lo, hi = _edges(getattr(processor, "size", None) or {})
    patch, merge = getattr(processor, "patch_size", None), getattr(processor, "merge_size", None)
    if lo is None or hi is None or not patch or not merge:
        return
    side = int(patch) * int(merge)
    name = f" for {family}" if family else ""
    if hi < side * side:
        raise InputError(f"max_pixels {hi} is below one merged patch{name} ({side}x{side} = {side * side} pixels): "
                         "every image would become 1 visual token",
                         hint=f"give --max-pixels >= {side * side} (and >= min_pixels {lo})")
    if lo > hi:
        raise InputError(f"min_pixels {lo} is above max_pixels {hi}{name}",
                         hint=f"give --max-pixels >= {lo} or --min-pixels <= {hi} (accepted: max_pixels >= "
                         f"{side * side}, min_pixels <= max_pixels)")


def check_prompt_length(n_tokens: int, text_config: Any) -> None:
    """InputError when a prompt of ``n_tokens`` tokens is longer than the model's ``max_position_embeddings``
    (the context it was trained for); nothing when the config states no limit."""
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and n_tokens > limit:
        raise InputError(f"the prompt is {n_tokens} tokens, longer than the model's max_position_embeddings "
                         f"({limit})", hint="lower --max-pixels or --max-frames, or shorten the question")


def prepare_sample(vlm: Any, sample: Any, source: Any = None, index: int | None = None) -> Any:
    """``vlm.prepare`` of ``sample`` (a LabelSample); an InputError raised by it (e.g. ``check_prompt_length``)
    is raised again naming the sample's id, and its file and line when ``source`` (sample ``index`` of it)
    can tell them (``ManifestSource.where``)."""
    try:
        return vlm.prepare(images=sample.images, video=sample.video, question=sample.question)
    except InputError as err:
        if err.sample is not None:
            raise
        where = source.where(index) if index is not None and hasattr(source, "where") else {}
        raise InputError(err.message, file=err.file or where.get("file"), line=err.line or where.get("line"),
                         sample=str(sample.id), hint=err.hint) from None
