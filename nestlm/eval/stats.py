"""Confidence intervals for accuracies and paired comparisons, and the verdict they support.

Accuracy on n problems is a binomial proportion: its 95% interval is Wilson's score
interval (well behaved at 0% and 100%, unlike the normal approximation). Two methods
scored on the SAME problems are compared pairwise: the difference of their accuracies
has a paired bootstrap interval (problems resampled with replacement, both methods'
outcomes kept together), which is much tighter than comparing two unpaired intervals.
A claim "A is at least as good as B" is *held* only when the paired interval of A - B
lies above zero, *not held* when it lies below zero, and *inconclusive* otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (``(0, 1)`` for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p by construction; min/max only keep float rounding from putting
    # the lower end a hair above 0% (or the upper below 100%)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def paired_difference(
    a: Sequence[bool], b: Sequence[bool], n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``a - b`` over paired outcomes and its percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are the two methods' outcomes (correct or not) on problem i.
    Returns ``{"diff", "lo", "hi", "n"}`` (accuracy points as fractions).
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return {"diff": 0.0, "lo": -1.0, "hi": 1.0, "n": 0}
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": n}


def verdict(lo: float, hi: float) -> str:
    """``held`` when the whole interval favours the claim (> 0), ``not held`` when it is
    wholly against it (< 0), ``inconclusive`` when it contains zero."""
    if lo > 0:
        return "held"
    if hi < 0:
        return "not held"
    return "inconclusive"
