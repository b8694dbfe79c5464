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


def test_better_and_non_inferior_rules_against_closed_forms() -> None:
    """Paired outcomes with a closed-form mean difference: k problems where only A is right, j where only B."""
    from nestlm.eval.stats import better, non_inferior

    def pair(k: int, j: int, n: int = 400) -> dict:
        a = [True] * k + [False] * j + [True] * ((n - k - j) // 2) + [False] * (n - k - j - (n - k - j) // 2)
        b = [False] * k + [True] * j + a[k + j :]
        d = paired_difference(a, b, n_boot=20000)
        assert d["diff"] == pytest.approx((k - j) / n)
        # the bootstrap interval of a mean of +-1/0 values: diff +- z * sd / sqrt(n), sd from the closed form
        sd = np.sqrt(((k + j) / n - ((k - j) / n) ** 2) / n)
        assert d["lo"] == pytest.approx(d["diff"] - 1.96 * sd, abs=0.006)
        assert d["hi"] == pytest.approx(d["diff"] + 1.96 * sd, abs=0.006)
        return d

    up = pair(40, 4)  # +9 points, sd ~1.7: better, and non-inferior
    assert better(up["lo"], up["hi"]) == "better" and non_inferior(up["lo"], up["hi"]) == "non-inferior"
    eq = pair(10, 10)  # 0 points, half-width ~2.2: not better, but non-inferior at a 3-point margin
    assert better(eq["lo"], eq["hi"]) == "inconclusive"
    assert non_inferior(eq["lo"], eq["hi"]) == "non-inferior"
    assert non_inferior(eq["lo"], eq["hi"], margin=0.01) == "inconclusive"  # a stricter margin: not shown
    down = pair(4, 40)
    assert better(down["lo"], down["hi"]) == "worse" and non_inferior(down["lo"], down["hi"]) == "inferior"
    # exact boundaries: the interval must clear the line, not touch it
    assert better(0.0, 0.1) == "inconclusive" and better(1e-9, 0.1) == "better"
    assert non_inferior(-0.03, 0.1) == "inconclusive" and non_inferior(-0.0299, 0.1) == "non-inferior"
    assert non_inferior(-0.2, -0.0301) == "inferior"
    with pytest.raises(ValueError, match="margin"):
        non_inferior(0.0, 0.1, margin=-0.01)
