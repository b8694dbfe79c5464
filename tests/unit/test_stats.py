"""Intervals and verdicts of the study: checked against closed forms and simulation."""

from __future__ import annotations

import numpy as np
import pytest

from nestlm.eval.stats import paired_difference, verdict, wilson_interval


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 20)  # never negative, not degenerate at 0%
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] < 1.0


def test_wilson_covers_the_true_rate() -> None:
    rng = np.random.default_rng(0)
    p, n = 0.3, 200
    hits = sum(lo <= p <= hi for lo, hi in (wilson_interval(int(rng.binomial(n, p)), n) for _ in range(400)))
    assert 0.92 <= hits / 400 <= 0.98


def test_paired_difference_and_verdicts() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(300) < 0.5
    better = base | (rng.random(300) < 0.3)  # strictly more right answers on the same problems
    d = paired_difference(better.tolist(), base.tolist())
    assert d["diff"] == pytest.approx(better.mean() - base.mean())
    assert 0 < d["lo"] < d["diff"] < d["hi"]
    assert verdict(d["lo"], d["hi"]) == "held"
    r = paired_difference(base.tolist(), better.tolist())
    assert verdict(r["lo"], r["hi"]) == "not held"
    same = paired_difference(base.tolist(), base.tolist())
    assert same["lo"] == same["hi"] == 0.0 and verdict(same["lo"], same["hi"]) == "inconclusive"
    noisy = paired_difference((rng.random(300) < 0.5).tolist(), (rng.random(300) < 0.5).tolist())
    assert noisy["lo"] < 0 < noisy["hi"] or abs(noisy["diff"]) > 0.08
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([True], [True, False])
