"""95% confidence intervals of the evaluation's aggregates (pure functions, numpy only).

Accuracy: the Wilson score interval of a binomial proportion. Preservation (accuracy / vanilla accuracy):
a PAIRED percentile bootstrap over samples (each resample draws sample ids with replacement and takes both
the method's and vanilla's answers on them), seeded, so the same records give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval (lo, hi) of successes / n, or None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_ratio_ci(method: Sequence[float], base: Sequence[float], resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of 100 * mean(method) / mean(base), pairs resampled together.

    method[i], base[i]: 0/1 correctness of the same sample i. None when fewer than 2 pairs or when
    every resample of ``base`` has mean 0.
    """
    m, b = np.asarray(method, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if m.shape != b.shape or m.size < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m.size, size=(resamples, m.size))
    num, den = m[idx].mean(1), b[idx].mean(1)
    ok = den > 0
    if not ok.any():
        return None
    ratio = 100.0 * num[ok] / den[ok]
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return float(lo), float(hi)
