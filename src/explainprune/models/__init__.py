"""Model adapters (one per family, same protocol) and `load`, which picks one from config.model_type."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from explainprune.errors import InputError
from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.models.hub import DEMO_PATH, checkpoint_file, resolve
from explainprune.models.llava import Llava
from explainprune.models.llava_onevision import LlavaOnevision
from explainprune.models.qwen2_vl import Qwen2VL
from explainprune.models.qwen3_vl import Qwen3VL
from explainprune.versions import check_transformers

ADAPTERS: tuple[type[VLM], ...] = (Qwen2VL, Qwen3VL, LlavaOnevision, Llava)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> type[VLM]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported model type {model_type!r}; explainprune supports: {', '.join(supported_model_types())}"
    )


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _model_type(config_file: Path) -> str:
    """``model_type`` of a checkpoint's config.json (InputError naming the file when it is unusable)."""
    try:
        config = json.loads(Path(config_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=config_file) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise InputError("has no model_type", file=config_file)
    return model_type


def check_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``"auto"`` (the checkpoint's own dtype), a torch dtype, or its name (float32, bfloat16, float16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)} or a torch.dtype")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def load(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
         device: str | torch.device | None = None, device_map: str | dict | None = None,
         attn_implementation: str = "sdpa", revision: str | None = None, trust_remote_code: bool = False,
         **processor_options: Any) -> VLM:
    """Load a checkpoint behind the adapter protocol.

    ``name_or_path``: ``"demo"`` (the shipped digits model), a checkpoint directory, or a hub id
    (``org/name``) resolved as ``from_pretrained`` resolves it (hub cache; ``HF_HUB_OFFLINE=1`` works
    with a populated cache) at ``revision``.
    ``dtype``: "auto" (the checkpoint's own), "float32", "bfloat16", "float16" or a torch dtype.
    ``device``: where the whole model goes (default cpu); ``device_map`` instead ("auto", "cuda",
    {"module": device}, ...; needs accelerate: ``pip install 'explainprune[gpu]'``) places it through
    accelerate and the model is not moved afterwards.
    ``processor_options``: image-processor settings such as ``min_pixels`` / ``max_pixels`` (Qwen) or
    ``size``, checked against the processor's accepted options.
    """
    check_transformers()  # before anything else: another release's seams give silently wrong results
    if device is not None and device_map is not None:
        raise InputError("give device or device_map, not both (device_map places the model itself)")
    dtype = check_dtype(dtype)
    if device_map is not None and not _accelerate_available():
        raise InputError("device_map needs the accelerate package",
                         hint="pip install 'explainprune[gpu]' (or pip install accelerate)")
    source = resolve(name_or_path, revision=revision)
    if isinstance(source, Path) and not (source / "config.json").is_file():
        raise InputError(f"no config.json in {source}",
                         hint="give a transformers checkpoint folder, a hub id or 'demo'")
    adapter = adapter_for(_model_type(checkpoint_file(source, "config.json", revision=revision)))
    if isinstance(source, Path) and not any(any(source.glob(p)) for p in WEIGHT_PATTERNS):
        raise InputError(f"no weights in {source} (no {', '.join(WEIGHT_PATTERNS[:2])} file beside config.json)",
                         hint="copy the checkpoint's weight files there too")
    return adapter.from_pretrained(source, dtype=dtype, device=device, device_map=device_map,
                                   attn_implementation=attn_implementation, revision=revision,
                                   trust_remote_code=trust_remote_code, **processor_options)


def _accelerate_available() -> bool:
    from transformers.utils import is_accelerate_available

    return bool(is_accelerate_available())


__all__ = ["ADAPTERS", "DEMO_PATH", "DTYPES", "VLM", "GenerationResult", "Prompt", "adapter_for", "check_dtype", "load",
           "supported_model_types"]
