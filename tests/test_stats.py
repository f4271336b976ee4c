"""The evaluation's intervals are what they say: 95% (percentiles 2.5 and 97.5)."""

from __future__ import annotations

import math

import pytest

from explainprune.evaluation.stats import Z95, paired_ratio_ci, wilson


def binomial_quantile(n: int, p: float, q: float) -> int:
    """Smallest k with P(Binomial(n, p) <= k) >= q (exact sum)."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_bootstrap_interval_is_the_95_percent_one():
    """A case with a known bootstrap law: vanilla always right, the method right on
    half of n = 200 samples. A resample's ratio is then 100 * Binomial(200, 1/2) / 200, so the 95% interval's
    ends are its 2.5% and 97.5% quantiles (86 and 114 of 200 -> 43% and 57%); a 90% interval would give
    44% and 56% (5% and 95%: 88 and 112)."""
    n = 200
    lo, hi = paired_ratio_ci([1, 0] * (n // 2), [1] * n, resamples=20000, seed=1)
    lo_k, hi_k = binomial_quantile(n, 0.5, 0.025), binomial_quantile(n, 0.5, 0.975)
    assert (lo_k, hi_k) == (86, 114)
    assert (binomial_quantile(n, 0.5, 0.05), binomial_quantile(n, 0.5, 0.95)) == (88, 112)
    assert lo == pytest.approx(100 * lo_k / n, abs=0.5) and hi == pytest.approx(100 * hi_k / n, abs=0.5)
    assert paired_ratio_ci([1, 0] * (n // 2), [1] * n, resamples=20000, seed=1) == (lo, hi)  # seeded


def test_wilson_is_the_95_percent_one():
    assert Z95 == pytest.approx(1.959963984540054)
    lo, hi = wilson(30, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.2189, 0.3958)  # Wilson 95% for 30/100 (textbook value)
