"""benchmarks/compare_outcomes.py: two study runs paired problem by problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark


def _outcomes(short: list[bool], long: list[bool]) -> dict:
    return {"every": ["short", "long"], "models": {"elastic/50": {"short": short, "long": long, "ppl": 1.0}}}


def test_rows_pair_outcomes_and_give_both_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    co = load_benchmark("compare_outcomes")
    a = _outcomes([True] * 80 + [False] * 20, [False] * 10)
    b = _outcomes([True] * 40 + [False] * 60, [False] * 10)
    rows = co.compare(a, b, "elastic/50")
    short, long = rows
    # A right on 80 problems, B on the first 40 of them: A - B is 40 points, every pair >= 0
    assert short["set"] == "short" and short["n"] == 100 and short["diff"] == pytest.approx(0.4)
    assert 0 < short["lo"] < 0.4 < short["hi"] and short["better"] == "better"
    # identical outcomes: a zero-width interval at 0, non-inferior but not better
    assert long["diff"] == long["lo"] == long["hi"] == 0
    assert (long["better"], long["non_inferior"]) == ("inconclusive", "non-inferior")
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert co.main([str(pa), str(pb), "--model", "elastic/50"]) == 0
    assert "| short | 100 | 80.0 | 40.0 | +40.0 [" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no model 'kd/50' in that outcomes file"):
        co.compare(a, b, "elastic/50", "kd/50")
    with pytest.raises(SystemExit, match="100 outcomes in A, 50 in B; pairs need the same problems and seeds"):
        co.compare(a, _outcomes([True] * 50, [False] * 10), "elastic/50")


def test_an_unreadable_outcomes_file_is_one_line(tmp_path: Path) -> None:
    co = load_benchmark("compare_outcomes")
    good = tmp_path / "a.json"
    good.write_text(json.dumps(_outcomes([True], [False])))
    with pytest.raises(SystemExit, match="cannot read .*missing.json"):
        co.main([str(tmp_path / "missing.json"), str(good), "--model", "elastic/50"])
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="is not an outcomes file"):
        co.main([str(good), str(tmp_path / "other.json"), "--model", "elastic/50"])


def test_parent_accuracy_writes_outcomes_compare_outcomes_pairs(tmp_path: Path) -> None:
    """parent_accuracy.py --outcomes (the shipped parent) pairs up with itself in compare_outcomes."""
    pa, co = load_benchmark("parent_accuracy"), load_benchmark("compare_outcomes")
    out = tmp_path / "o.json"
    assert pa.main(["--spec", "short:1:3", "long:1:2", "--outcomes", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["every"] == ["short:1", "long:1"]
    assert [len(got["models"]["model"][s]) for s in got["every"]] == [3, 2]
    rows = co.compare(got, got, "model")
    assert [(r["set"], r["n"], r["diff"]) for r in rows] == [("short:1", 3, 0), ("long:1", 2, 0)]
