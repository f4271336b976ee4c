"""Model adapters (one per family, same protocol) and `load`, which picks one from config.model_type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from explainprune.errors import InputError
from explainprune.models.base import VLM, GenerationResult, Prompt
from explainprune.models.llava import Llava
from explainprune.models.llava_onevision import LlavaOnevision
from explainprune.models.qwen2_vl import Qwen2VL
from explainprune.models.qwen3_vl import Qwen3VL

ADAPTERS: tuple[type[VLM], ...] = (Qwen2VL, Qwen3VL, LlavaOnevision, Llava)
DEMO_PATH = Path(__file__).resolve().parent.parent / "assets" / "demo"


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


def _model_type(path: str | Path, trust_remote_code: bool) -> str:
    config_file = Path(path) / "config.json"
    if Path(path).is_dir() and not config_file.is_file():
        raise InputError(f"no config.json in {path}", hint="give a transformers checkpoint folder, a hub id or 'demo'")
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"not valid JSON ({err})", file=config_file) from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if not model_type:
            raise InputError("has no model_type", file=config_file)
        return model_type
    from transformers import AutoConfig  # a hub id: resolved (and cached) by transformers

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code).model_type


def load(name_or_path: str | Path, **kwargs: Any) -> VLM:
    """Load a checkpoint behind the adapter protocol.

    ``"demo"`` is the shipped digits model; anything else is a transformers checkpoint directory or hub id
    of a supported family. Keyword options: ``dtype``, ``device``, ``attn_implementation`` ("sdpa"),
    ``trust_remote_code`` (False; only passed on when you ask).
    """
    if str(name_or_path) == "demo":
        if not (DEMO_PATH / "config.json").is_file():
            raise FileNotFoundError(f"the demo model is not installed at {DEMO_PATH}")
        name_or_path = DEMO_PATH
    path = Path(name_or_path)
    if not path.exists() and (str(name_or_path).startswith((".", "/")) or path.suffix):
        raise FileNotFoundError(f"no checkpoint at {name_or_path}")
    adapter = adapter_for(_model_type(name_or_path, bool(kwargs.get("trust_remote_code", False))))
    if path.is_dir() and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise InputError(f"no weights in {path} (no {', '.join(WEIGHT_PATTERNS[:2])} file beside config.json)",
                         hint="copy the checkpoint's weight files there too")
    return adapter.from_pretrained(name_or_path, **kwargs)


__all__ = ["ADAPTERS", "VLM", "GenerationResult", "Prompt", "adapter_for", "load", "supported_model_types"]
