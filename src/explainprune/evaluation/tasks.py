"""Task adapters for evaluation: the built-in digits task or a JSONL manifest, as indexable sample sets.

Both yield ``explainprune.sources.LabelSample`` (id, question, answer, images or video, region, meta["kind"]),
the same samples labelling reads, so eval and label agree on what a sample is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TaskConfig:
    """Which samples to evaluate.

    name:    "digits" (the built-in task) or the path of a manifest (.jsonl file or its directory)
    split:   digits split ("test" by default; train and test use disjoint source digits)
    limit:   at most this many samples (digits: exactly this many; default 200)
    options: extra DigitsTask options (grid, cell, frames, kinds, ...)
    """

    name: str = "digits"
    split: str = "test"
    seed: int = 0
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "seed": self.seed, "limit": self.limit,
                **({"options": self.options} if self.options else {})}


DIGITS_DEFAULT_N = 200


def load_task(config: TaskConfig, on_error: str = "stop") -> Any:
    """An indexable sample set (``len``, ``[i]`` -> LabelSample, ``describe()``) for ``config``. A manifest's
    images are checked from their headers now: a bad one is refused (``on_error="stop"``) or raised when its
    sample is read (``"skip"``: the runner skips and lists it)."""
    from explainprune.labels import DigitsSource, ManifestSource

    if config.name == "digits":
        n = DIGITS_DEFAULT_N if config.limit is None else config.limit  # checked by the source
        return DigitsSource(split=config.split, seed=config.seed, n=n, **config.options)
    path = Path(config.name)
    if not path.exists():
        raise FileNotFoundError(f"unknown task {config.name!r}: give 'digits' or the path of a manifest "
                                "(JSONL: question, answer, image/images/video per line)")
    return ManifestSource(path, limit=config.limit, on_error=on_error)


def sample_kind(sample: Any) -> str:
    """The sample's kind (``meta["kind"]``), else its modality: "video" or "image"."""
    kind = (getattr(sample, "meta", None) or {}).get("kind")
    if kind:
        return str(kind)
    return "video" if getattr(sample, "video", None) is not None else "image"
