"""How much memory a device has free, and the relevance engine's automatic ``head_chunk``.

The relevance engine (``relevance.py``) recomputes one decoder layer at a time with eager attention. Its
peak is about ``BYTES_PER_HEAD`` bytes per head and per n² (n = prompt + answer tokens): the saved maps,
their gradients, the softmax backward in float32 and the eager mask (docs/relevance.md: 13.1 B measured
in float32 on CPU; ~16 B reported in bfloat16 on a GPU, issue 10). With ``head_chunk=c`` it is about
``BYTES_PER_HEAD·c·n² + FLOOR_BYTES·n²``. ``auto_head_chunk`` picks the largest ``c`` that fits.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

BYTES_PER_HEAD = 16.0  # per head · n², the default (all heads at once) path, 2- and 4-byte dtypes
FLOOR_BYTES = 18.0     # per n², what the chunked path holds besides its c heads (mask, float copies)
SAFETY = 0.8           # share of the free memory the estimate may use


def _scale(dtype: torch.dtype) -> float:
    """1 for 2- and 4-byte dtypes (the measured cases); 8-byte dtypes double every map."""
    return max(4, torch.empty((), dtype=dtype).element_size()) / 4


def auto_head_chunk(n_tokens: int, heads: int, dtype: torch.dtype, free_bytes: int | float,
                    safety: float = SAFETY) -> int | None:
    """The ``head_chunk`` for one relevance run: None when all ``heads`` heads' n x n maps of one layer
    fit in ``safety · free_bytes`` (the default path), else the most heads per chunk that fit (at least 1,
    at most heads - 1). n_tokens: the teacher-forced sequence length (prompt + answer - 1)."""
    if n_tokens < 1 or heads < 1:
        raise ValueError(f"n_tokens and heads must be positive; got {n_tokens}, {heads}")
    n2 = float(n_tokens) ** 2 * _scale(dtype)
    budget = safety * float(free_bytes)
    if heads * BYTES_PER_HEAD * n2 <= budget:
        return None
    c = int((budget - FLOOR_BYTES * n2) // (BYTES_PER_HEAD * n2))
    return max(1, min(heads - 1, c))


def _cpu_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else psutil, else free physical pages (sysconf)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device``: CUDA's ``mem_get_info`` (plus what PyTorch's caching allocator holds
    reserved but unused), the system's available memory for CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return _cpu_available()
    return None


def relevance_head_chunk(vlm: Any, n: int) -> int | None:
    """``head_chunk`` for an n-token run: None if one layer's maps fit on every layer's device (or the free
    memory is unknown), else ``auto_head_chunk``'s choice; warns when chunking is needed but unsupported."""
    from explainprune.attention import CHUNKABLE, module_device

    layers = vlm.language_model.layers
    frees = [free_memory(d) for d in {module_device(layer) for layer in layers}]
    if not frees or any(f is None for f in frees):
        return None
    heads = int(vlm.text_config.num_attention_heads)
    chunk = auto_head_chunk(n, heads, next(layers.parameters()).dtype, min(frees))
    if chunk is not None and {type(layer.self_attn).__name__ for layer in layers} - set(CHUNKABLE):
        warnings.warn(f"relevance: one layer's attention maps over {n} tokens may not fit in free memory, and "
                      "head-chunking is not implemented for this attention class; trying all heads at once",
                      stacklevel=3)
        return None
    return chunk

