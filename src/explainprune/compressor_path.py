"""Where a compressor given as a folder is loaded from: the folder itself, or a training run's.

``explainprune train --out RUN`` (and the demo's ``OUT/compressor`` step) writes the loadable f_θ to
``RUN/compressor``; users naturally pass ``RUN``. ``compressor_dir`` maps either to the folder
``Compressor.from_pretrained`` reads, so every place that takes a compressor (``eval``, ``show``, the demo,
the lmms-eval model, ``get_pruner("learned", compressor=...)``) accepts both.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

RUN_SUBFOLDER = "compressor"
# f_θ trained for the shipped demo model on several board sizes and frame counts (docs/compressor.md, issue 20);
# ``compressor="demo"`` names it wherever a compressor is taken, as ``--model demo`` names the demo model
DEMO_COMPRESSOR = Path(__file__).resolve().parent / "assets" / "demo_compressor"


def is_compressor_dir(path: str | os.PathLike) -> bool:
    """A folder holding a saved compressor (config.json and model.safetensors)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def compressor_dir(value: Any) -> Any:
    """``value`` if it is a compressor folder; ``value/compressor`` if ``value`` is a training run folder
    holding one (same type as given: str or Path); ``"demo"`` the shipped demo compressor (``DEMO_COMPRESSOR``)
    unless a folder of that name exists; anything else (a ``Compressor``, a hub id, a missing
    path) unchanged, for the loader to judge."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    if value == "demo" and not Path(value).exists():  # a local folder named demo wins
        return str(DEMO_COMPRESSOR)
    path = Path(value).expanduser()
    if not path.is_dir() or is_compressor_dir(path):
        return value
    inner = path / RUN_SUBFOLDER
    if is_compressor_dir(inner):
        return inner if isinstance(value, os.PathLike) else str(inner)
    return value


def weights_sha256(directory: str | os.PathLike) -> str | None:
    """SHA-256 of a compressor folder's model.safetensors (None when there is none)."""
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
