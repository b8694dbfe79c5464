"""nestlm eval's terminal table: names are never cut, so `acc` and `acc_norm` never look the same."""

from __future__ import annotations

import pytest

from nestlm.eval.report import print_table

ROWS = [
    {
        "name": name,
        "kind": "elastic",
        "params": params,
        "fraction": params / 1_200_000,
        "accuracy": 0.5,
        "accuracy_ci": [0.4, 0.6],
        "accuracy_n": 200,
        "tasks": {"arc_easy/acc": a, "arc_easy/acc_norm": a + 0.1, "hellaswag/acc": a / 2, "hellaswag/acc_norm": a / 3},
    }
    for name, params, a in (("full", 1_200_000, 0.61), ("75", 900_000, 0.52), ("50", 600_000, 0.43))
]


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_metric_names_sharing_a_prefix_are_printed_whole(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    monkeypatch.setenv("COLUMNS", columns)  # the terminal width rich reads
    print_table(ROWS, title="a model with a long name on reasoning")
    out = capsys.readouterr().out
    assert "\u2026" not in out and "..." not in out  # no ellipsis anywhere
    lines = out.splitlines()
    for task in ("arc_easy", "hellaswag"):
        acc = [ln for ln in lines if f" {task} " in ln and " acc " in ln]
        norm = [ln for ln in lines if f" {task} " in ln and " acc_norm " in ln]
        assert len(acc) == 1 and len(norm) == 1, out
    norm = next(ln for ln in lines if " arc_easy " in ln and " acc_norm " in ln)
    assert "0.7100" in norm and "0.6200" in norm and "0.5300" in norm  # each model's own value, in order
    for head in ("model", "params", "of parent", "reasoning acc", "95% interval", "problems"):
        assert head in out, head
    assert "a model with a long name on reasoning" in out
