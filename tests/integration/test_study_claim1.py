"""The claim-1 investigation (benchmarks/study_claim1.py) in its --quick mode: every method measured at
every budget, token counts as the recipe says, verdicts that follow from their intervals, the KD table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
ELASTIC = ["elastic", "elastic, fixed", "elastic, 3 T1", "elastic, lr 5e-4", "elastic, router lr 10x"]
ELASTIC += ["elastic, fixed, 3 T1", "elastic, one-shot init"]
ELASTIC += ["elastic, soft", "elastic, soft, one-shot init", "elastic, soft, hetero", "elastic, soft, router lr 10x"]
ELASTIC += ["elastic, soft, search init"]


def _script():
    return load_benchmark("study_claim1")


@pytest.mark.slow
def test_quick_investigation_measures_every_method(tmp_path: Path) -> None:
    script = _script()
    out = tmp_path / "claim1"
    assert script.main(["--out", str(out), "--quick"]) == 0
    res = json.loads((out / "results.json").read_text())
    m, runs = res["models"], res["runs"]
    for method in ELASTIC:
        for b in ("full", "75", "50"):
            assert len(m[f"{method}/{b}"]["short"]) == 24, (method, b)
    for method in ("prune+KD", "prune+KD, T1/3"):
        for b in ("75", "50"):
            assert len(m[f"{method}/{b}"]["short"]) == 24
    t1 = runs["elastic"]["tokens"]
    assert t1 == 3 * 8 * 320  # --quick: 3 steps of 8 rows x 320 tokens
    assert runs["elastic, 3 T1"]["tokens"] == runs["elastic, fixed, 3 T1"]["tokens"] == 3 * t1
    assert runs["prune+KD"]["tokens"] == 2 * t1  # two sizes, T1 each
    assert runs["prune+KD, T1/3"]["tokens"] == 2 * (t1 // 3)
    # fixed archs are the one-shot choices, the same at 3 T1; learned ones are the routers' own
    assert m["elastic, fixed/75"]["arch"] == m["elastic, fixed, 3 T1/75"]["arch"]
    report = (out / "report.md").read_text()
    cells = re.findall(r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\] (held|not held|inconclusive)", report)
    assert len(cells) == 2 * 2 * len(ELASTIC)  # two references x two small budgets x every elastic run
    for diff, lo, hi, v in cells:
        lo_, hi_ = float(lo), float(hi)
        assert lo_ <= float(diff) <= hi_
        # (printed to 0.1: an interval whose end rounds to 0.0 may lie on either side of it)
        assert {"held": lo_ >= 0, "not held": hi_ <= 0, "inconclusive": lo_ <= 0 <= hi_}[v], (diff, lo, hi, v)
    assert len(res["kd"]) == 4 and all(r["parent (one-shot)"] > 0 for r in res["kd"])
    assert "parent (one-shot)" in report
    # every learned-router run records, per budget, whether freezing kept the routers' own choice
    for method in ELASTIC:
        own = runs[method]["own_choice"]
        assert set(own) == {"full", "75", "50"} and own["full"] is None
        assert all(isinstance(own[b], bool) for b in ("75", "50")) != method.startswith("elastic, fixed")
