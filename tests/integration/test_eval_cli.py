"""`nestlm eval` on an elastic checkpoint, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nestlm.cli import main
from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ev") / "run"
    train(load_recipe("tiny", ["data.max_bytes=60000", "stages.0.steps=4", "stages.1.steps=2"]), out, progress=False)
    return out


def test_eval_all_budgets_writes_report(elastic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rep"
    args = [
        "eval",
        "--model",
        str(elastic),
        "--budget",
        "all",
        "--data",
        "reasoning",
        "--out",
        str(out),
        "--num-problems",
        "40",
        "--num-reasoning",
        "4",
    ]
    assert main(args) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["full", "75", "50"]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert all(r["ppl"] > 1 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (out / "quality.png").stat().st_size > 1000 and "| model |" in (out / "report.md").read_text()


def _err(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nestlm: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_eval_bad_input(elastic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _err(capsys, ["eval", "--model", str(elastic), "--budget", "7b", "--out", str(tmp_path / "o")])
    assert "unknown budget '7b'; known budgets: full, 75, 50" in err
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _err(capsys, ["eval", "--model", str(elastic), "--out", str(f)])
    assert f.read_text() == "x"
    err = _err(
        capsys, ["eval", "--model", str(elastic), "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    assert "does not exist" in err
    assert "unknown budget" in _err(
        capsys, ["slice", "--model", str(elastic), "--budget", "7b", "--out", str(tmp_path / "s")]
    )
    assert "does not exist" in _err(capsys, ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_demo_refuses_a_file_and_a_busy_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _err(capsys, ["demo", "--out", str(f)])
    d = tmp_path / "busy"
    d.mkdir()
    (d / "keep").write_text("x")
    assert "not empty" in _err(capsys, ["demo", "--out", str(d)])
    assert (d / "keep").read_text() == "x"


def test_demo_refuses_an_unknown_override_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "unknown key recipe.train.nope" in _err(capsys, ["demo", "--out", str(tmp_path / "d"), "train.nope=1"])
    assert not (tmp_path / "d").exists()
