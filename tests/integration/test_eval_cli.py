"""`nestlm eval` on an elastic checkpoint, and its bad input; reports (eval and demo) written all or none."""

from __future__ import annotations

import errno
import json
import os
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


# ------------------------------------------------------------------ reports are written all or none
def _files(d: Path) -> dict[str, bytes]:
    """Every entry of ``d`` (hidden ones included: a temporary directory shows here) with its bytes."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in d.iterdir()}


def _full_disk_halfway(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """``plot``: eval.json and report.md written, the PNG half-written when the disk fills. ``rename``: every
    file written, then renaming the last (eval.json) into place fails: those already replaced must be put back."""
    from nestlm.eval import report

    if how == "plot":

        def plot(rows, path, metric="ppl"):
            Path(path).write_bytes(b"\x89PNG\r\n half of a plot")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(report, "plot", plot)
        return
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "eval.json" and ".report-tmp" in str(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("how", ["plot", "rename"])
def test_a_report_failing_halfway_leaves_the_previous_report_whole(
    how: str, elastic: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file, never touched")
    base = ["eval", "--model", str(elastic), "--data", "none", "--out", str(out)]
    assert main([*base, "--budget", "all"]) == 0
    before = _files(out)
    assert set(before) == {"eval.json", "report.md", "quality.png", "notes.txt"}
    assert [r["name"] for r in json.loads(before["eval.json"])["rows"]] == ["full", "75", "50"]
    capsys.readouterr()
    assert main([*base, "--budget", "50"]) == 2  # a report is never replaced unasked
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a report; pass --overwrite" in err[0], err
    assert _files(out) == before
    _full_disk_halfway(monkeypatch, how)
    assert main([*base, "--budget", "50", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert _files(out) == before  # byte-identical, and no temporary directory left behind
    monkeypatch.undo()
    assert main([*base, "--budget", "50", "--overwrite"]) == 0  # the new report replaces the old one whole
    after = _files(out)
    assert set(after) == set(before) and after["notes.txt"] == before["notes.txt"]
    assert [r["name"] for r in json.loads(after["eval.json"])["rows"]] == ["50"]
    assert after["report.md"] != before["report.md"]  # (the plot is empty either way: --data none has no metric)


def test_a_demo_whose_report_fails_leaves_no_part_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo on the shipped parent, cut down (a step per stage; the slow evaluation replaced by fixed rows):
    its report is eval.json, report.md, quality.png and timings.json, which appear together or not at all."""
    from nestlm.demo import run_demo
    from nestlm.errors import OutputError
    from nestlm.eval import evaluate

    def rows(models, total_params=None, quick=False, progress=True):
        keep = ("name", "kind", "path", "budget")
        return [
            {k: m[k] for k in keep if k in m}
            | {"params": 1000 - i, "fraction": 1 - i / 10, "loss": 1.0 + i, "ppl": 2.7 + i, "accuracy": 0.5}
            | {"accuracy_ci": [0.4, 0.6], "accuracy_n": 16, "correct": [True] * 8 + [False] * 8}
            for i, m in enumerate(models)
        ]

    monkeypatch.setattr(evaluate, "evaluate_models", rows)
    ov = ["stages.0.steps=1", "stages.1.steps=1", "stages.0.seq_len=64", "stages.1.seq_len=64"]
    ov += ["stages.0.batch_size=2", "stages.1.batch_size=2", "stages.0.warmup_steps=0"]
    ov += ["data.num_problems=200", "train.threads=1"]
    out = tmp_path / "demo"
    _full_disk_halfway(monkeypatch, "plot")
    with pytest.raises(OutputError, match="No space left on device") as failed:
        run_demo(out, quick=True, progress=False, overrides=ov)
    assert "quality.png" in str(failed.value)  # it failed writing the report, everything else done
    assert sorted(p.name for p in out.iterdir()) == ["elastic", "parent-ranked", "pruned", "slices"]
    monkeypatch.undo()
    from nestlm.eval.report import write_report

    timings = {"total": 1.5}
    write_report(rows([{"name": "m", "kind": "model", "path": "m"}]), out, files={"timings.json": json.dumps(timings)})
    assert {"eval.json", "report.md", "quality.png", "timings.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "timings.json").read_text()) == timings
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
