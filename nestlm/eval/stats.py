"""Confidence intervals for accuracies and paired comparisons, and the verdict they support.

Accuracy on n problems is a binomial proportion: its 95% interval is Wilson's score
interval (well behaved at 0% and 100%, unlike the normal approximation). Two methods
scored on the SAME problems are compared pairwise: the difference of their accuracies
has a paired bootstrap interval (problems resampled with replacement, both methods'
outcomes kept together), which is much tighter than comparing two unpaired intervals.
Two rules read a paired interval [lo, hi] of A - B, each for the claim its words make:

* *better* (``better``): A is better than B when lo > 0, worse when hi < 0, else inconclusive;
* *non-inferior* with a margin m (``non_inferior``; 3 points unless a table says otherwise): A is
  non-inferior to B when lo > -m (A may be at most m worse, at 95%), inferior when hi < -m, else
  inconclusive. A claim of "as good as" (a nested budget vs per-size training, the full budget vs
  the parent) can only be held this way: a strictly-better rule never holds an equality.
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


MARGIN = 0.03  # the non-inferiority margin, in accuracy (3 points)


def better(lo: float, hi: float) -> str:
    """The *better* rule: ``better`` when the whole interval of A - B is above zero, ``worse`` when it is
    below zero, ``inconclusive`` when it holds zero."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "inconclusive"


def non_inferior(lo: float, hi: float, margin: float = MARGIN) -> str:
    """The *non-inferiority* rule with ``margin``: ``non-inferior`` when the interval of A - B lies above
    -margin, ``inferior`` when it lies below -margin, ``inconclusive`` when it holds -margin."""
    if margin < 0:
        raise ValueError(f"a non-inferiority margin is >= 0, got {margin}")
    if lo > -margin:
        return "non-inferior"
    if hi < -margin:
        return "inferior"
    return "inconclusive"


def verdict(lo: float, hi: float) -> str:
    """The *better* rule under its older names, for the claims worded "A beats B": ``held`` when the whole
    interval favours the claim (> 0), ``not held`` when it is wholly against it (< 0), ``inconclusive``
    when it contains zero. Not a test of "at least as good as": that is ``non_inferior``."""
    if lo > 0:
        return "held"
    if hi < 0:
        return "not held"
    return "inconclusive"


def paired_comparison(a: Sequence[bool], b: Sequence[bool], margin: float = MARGIN) -> dict[str, float | str]:
    """``paired_difference(a, b)`` with the verdicts of both rules (``better``, ``non_inferior``) and the
    older ``verdict``: what a study's table cell of A - B shows."""
    d: dict[str, float | str] = dict(paired_difference(a, b))
    d["verdict"] = verdict(d["lo"], d["hi"])
    d["better"] = better(d["lo"], d["hi"])
    d["non_inferior"] = non_inferior(d["lo"], d["hi"], margin)
    return d
