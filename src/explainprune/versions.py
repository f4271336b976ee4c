"""The transformers versions explainprune runs on, checked before any model work.

The adapters cut at transformers' own seams (``get_image_features``, ``get_rope_index``, the processors'
token layout), and those moved between releases: below 5.18, Qwen3-VL's DeepStack features come as one
flat tensor per level, LLaVA-OneVision's video features lack the trailing newline row and Qwen2.5-VL's
``get_rope_index`` truncates ``second_per_grid_ts`` to an integer (every frame at fps 4 gets the same
temporal position). So a run on a transformers outside ``TRANSFORMERS`` stops with one line naming the
installed and the required version, whether explainprune is installed or used from ``PYTHONPATH=src``
(the range is here, not read from the package's metadata). ``EXPLAINPRUNE_ALLOW_TRANSFORMERS=1`` runs
anyway, with a warning, for those who test a newer release.
"""

from __future__ import annotations

import os
import warnings

from explainprune.errors import InputError

__version__ = "0.1.0"  # explainprune's own (pyproject.toml declares the same; explainprune.__version__)
TRANSFORMERS = ">=5.18,<5.25"  # pyproject.toml declares the same range (tests/test_versions.py)
ALLOW_ENV = "EXPLAINPRUNE_ALLOW_TRANSFORMERS"


def installed_transformers() -> str:
    import transformers

    return str(transformers.__version__)


def check_transformers(version: str | None = None) -> str:
    """``version`` (default: the installed transformers) if it is in ``TRANSFORMERS``; else an InputError
    naming both (or a warning when ``EXPLAINPRUNE_ALLOW_TRANSFORMERS=1``)."""
    from packaging.specifiers import SpecifierSet

    version = installed_transformers() if version is None else version
    if SpecifierSet(TRANSFORMERS).contains(version, prereleases=True):
        return version
    message = (f"transformers {version} is installed, but explainprune needs transformers{TRANSFORMERS} (its "
               f"model seams differ elsewhere and results would be silently wrong)")
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{message}; running anyway because {ALLOW_ENV}=1", stacklevel=2)
        return version
    raise InputError(message, hint=f"pip install 'transformers{TRANSFORMERS}' (or set {ALLOW_ENV}=1 to try anyway)")
