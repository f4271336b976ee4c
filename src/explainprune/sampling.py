"""Balanced sampling over strata and the paper's video-duration buckets (``label --dataset --target``).

``balanced_indices`` spreads a sample evenly over strata (water-filling); ``duration_bucket`` /
``video_duration`` put a video in the paper's 0-30 s, 30-60 s, 1-2 min, 2-3 min buckets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from explainprune.errors import InputError

DURATION_BUCKETS = ((0, 30, "0-30s"), (30, 60, "30-60s"), (60, 120, "1-2min"), (120, 180, "2-3min"))


def balanced_indices(strata: Sequence[tuple[str, ...]], target: int | None, seed: int = 0) -> list[int]:
    """Indices of a sample of ``target`` items spread as evenly as possible over ``strata`` (one key per
    item): every stratum gets an equal share, a stratum with fewer items gives its surplus to the others
    (water-filling); items within a stratum are drawn by ``seed``. Sorted; deterministic."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        groups[key].append(i)
    if target is None or target >= len(strata):
        return list(range(len(strata)))
    rng = random.Random(seed)
    keys = sorted(groups)
    for k in keys:
        rng.shuffle(groups[k])
    quota, left = dict.fromkeys(keys, 0), target
    open_keys = list(keys)
    while left > 0 and open_keys:
        share = max(1, left // len(open_keys))
        for k in list(open_keys):
            take = min(share, len(groups[k]) - quota[k], left)
            quota[k] += take
            left -= take
            if quota[k] == len(groups[k]):
                open_keys.remove(k)
            if left == 0:
                break
    return sorted(i for k in keys for i in groups[k][: quota[k]])


def duration_bucket(seconds: float | None) -> str:
    """The paper's duration buckets: 0-30 s, 30-60 s, 1-2 min, 2-3 min (longer: ">3min")."""
    if seconds is None:
        return "unknown"
    for lo, hi, name in DURATION_BUCKETS:
        if lo <= seconds < hi:
            return name
    return ">3min"


def video_duration(path: str | Path) -> float | None:
    """A video file's duration in seconds from its container metadata (no decoding); None if unknown.
    A folder of frames has no duration."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        import av
    except ImportError:  # without PyAV every video would silently land in "unknown"
        raise InputError("--strata duration needs PyAV to read video durations", file=path,
                         hint="pip install av (or 'explainprune[video]'), or leave duration out of --strata") from None
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return None if c.duration is None else c.duration / 1_000_000
    except Exception:
        return None
