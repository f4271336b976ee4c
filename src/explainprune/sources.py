"""Label sample sources: what ``explainprune label`` (``explainprune.labels.label``) and evaluation read.

A source is a deterministic, indexable set of ``LabelSample``s (same index, same sample) that can
``describe()`` itself (the description goes into a label run's ``run.json``):
  DigitsSource    the built-in digits task (``explainprune.tasks.digits``), with ground-truth regions
  ManifestSource  a JSONL manifest of questions, answers and image / video paths (``read_video`` for files)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from explainprune.models.base import Video


@dataclass
class LabelSample:
    """One input to label. ``region``: ground-truth (frame, row, col) cells on the visual-token grid."""

    id: str
    question: str
    answer: str
    images: Any = None
    video: Any = None
    region: list[tuple[int, int, int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class SampleSource(Protocol):
    """A deterministic, indexable sample set (same index, same sample)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> LabelSample: ...
    def describe(self) -> dict[str, Any]: ...


class DigitsSource:
    """The built-in digits task (``explainprune.tasks.digits``) as a label source."""

    def __init__(self, split: str = "train", seed: int = 0, n: int = 2000, **options: Any):
        from explainprune.tasks.digits import DigitsTask

        self.options = {"split": split, "seed": seed, "n": n, **options}
        self.task = DigitsTask(split=split, seed=seed, n=n, **options)

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int) -> LabelSample:
        s = self.task.sample(i)
        return LabelSample(s.id, s.question, s.answer, images=s.image, video=s.video,
                           region=[tuple(c) for c in s.region], meta={"kind": s.kind})

    def describe(self) -> dict[str, Any]:
        return {"task": "digits", **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}


class ManifestSource:
    """A JSONL manifest, one sample a line: ``question``, ``answer`` and ``image`` (path), ``images`` (paths)
    or ``video`` (frame paths, or one video file, ``max_frames`` frames sampled evenly); optional ``id``,
    ``region`` ([[frame, row, col], ...] token cells), ``kind`` and ``fps`` (the rate the listed frames were
    sampled at; Qwen2.5-VL's temporal positions use it). Paths are relative to the manifest.
    (``DigitsTask.export`` writes this format.)"""

    def __init__(self, path: str | Path, limit: int | None = None, max_frames: int = 8):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "manifest.jsonl"
        if not self.path.is_file():
            raise FileNotFoundError(f"no manifest at {path}")
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        self.records = []
        for k, line in enumerate(lines[:limit]):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}:{k + 1}: not JSON ({err})") from None
            missing = [f for f in ("question", "answer") if f not in rec]
            if missing or not any(f in rec for f in ("image", "images", "video")):
                raise ValueError(f"{self.path}:{k + 1}: needs question, answer and image/images/video "
                                 f"(missing: {', '.join(missing) or 'media'})")
            self.records.append(rec)
        self.limit, self.max_frames = limit, max_frames

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, rel: str) -> Any:
        from PIL import Image

        return Image.open(self.path.parent / rel).convert("RGB")

    def __getitem__(self, i: int) -> LabelSample:
        rec = self.records[i]
        images = video = None
        if "image" in rec:
            images = self._open(rec["image"])
        elif "images" in rec:
            images = [self._open(p) for p in rec["images"]]
        elif isinstance(rec["video"], str):
            video = read_video(self.path.parent / rec["video"], self.max_frames)
        else:
            video = Video([self._open(p) for p in rec["video"]], fps=rec.get("fps"))
        region = [tuple(c) for c in rec["region"]] if rec.get("region") is not None else None
        meta = {k: v for k, v in rec.items() if k in ("kind",)}
        return LabelSample(str(rec.get("id", i)), rec["question"], rec["answer"], images=images, video=video,
                           region=region, meta=meta)

    def describe(self) -> dict[str, Any]:
        import hashlib

        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return {"task": "manifest", "manifest": str(self.path.resolve()), "sha256": digest, "limit": self.limit,
                "max_frames": self.max_frames}


def read_video(path: str | Path, max_frames: int = 8) -> Video:
    """Up to ``max_frames`` evenly spaced RGB frames of a video file (needs PyAV: ``pip install av``).

    Returns a ``Video`` (a list of the frames) whose ``fps`` is the rate of the sampled frames (the file's
    frame rate times the share of frames kept; None when the file states no rate).
    """
    try:
        import av
    except ImportError:
        raise ValueError(f"reading {path} needs PyAV (pip install 'explainprune[video]')") from None
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        frames = [f.to_image() for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    step = max(1, len(frames) / max_frames)
    picked = [frames[int(k * step)] for k in range(min(max_frames, len(frames)))]
    return Video(picked, fps=float(rate) * len(picked) / len(frames) if rate else None)
