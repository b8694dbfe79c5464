"""Bad input to `nestlm train`: one clear line, exit code 2, nothing lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nestlm.cli import main

FAST = ["data.max_bytes=60000", "stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=2"]


def run(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def listing(p: Path) -> list[str]:
    return sorted(str(q.relative_to(p)) for q in p.rglob("*")) if p.exists() else []


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "unknown key recipe.train.lrr; valid keys: mode, lr,"),
        ("train.lr=fast", "recipe.train.lr = 'fast' must be a number"),
        ("stages.1.budget_probs=[0.5,0.3,0.3]", "must be non-negative and sum to 1"),
        ("elastic.axes.mamba_heads=[1.0,3]", "not a multiple of the 2 Mamba groups"),
        ("elastic.budgets={full: 1.0, tiny: 0.01}", "budget 'tiny'"),
        ("stages.0.seq_len=100000", "fewer than one block"),
    ],
)
def test_bad_recipe_values(capsys: pytest.CaptureFixture, tmp_path: Path, override: str, needle: str) -> None:
    out = tmp_path / "out"
    extra = ["stages.1.budget_probs=uniform"] if "budgets" in override else []
    code, err = run(capsys, ["train", "tiny", "--out", str(out), "--no-progress", *FAST, override, *extra])
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("nestlm: error:"), err
    assert needle in err, err
    assert "Traceback" not in err
    assert not out.exists() or listing(out) == []


def test_resume_without_checkpoint(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, err = run(capsys, ["train", "tiny", "--out", str(tmp_path / "none"), "--resume", *FAST])
    assert code == 2 and "no run to resume" in err


def test_out_holding_another_run_is_kept(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *FAST]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code, err = run(capsys, ["train", "tiny", "--out", str(out), "--no-progress", *FAST])
    assert code == 2 and "already holds this run" in err and "--resume" in err  # the same command: the same run
    code, err = run(capsys, ["train", "tiny", "--out", str(out), "--no-progress", *FAST, "train.lr=0.5"])
    assert code == 2 and "already holds a different run" in err and "train.lr" in err and "0.5 now" in err
    code, err = run(capsys, ["train", "tiny", "--out", str(out), "--no-progress", "--resume", *FAST, "train.lr=0.5"])
    assert code == 2 and "holds a different run" in err
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_nan_loss_stops_and_keeps_last_good_checkpoint(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    # a learning rate this large blows the weights up within a few steps
    args = [
        "train",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        *FAST,
        "train.lr=1e6",
        "train.grad_clip=0",
        "stages.0.steps=30",
    ]
    code, err = run(capsys, args)
    assert code == 2, err
    assert "loss became" in err and "Last good checkpoint" in err
    cks = sorted(p for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    for ck in cks:  # whatever was saved is complete and finite
        assert (ck / "state.json").is_file()
    assert not (out / "config.json").exists()  # no final model from a failed run


def test_out_is_a_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep me")
    code, err = run(capsys, ["train", "tiny", "--out", str(f), *FAST])
    assert code == 2 and "is a file" in err
    assert f.read_text() == "keep me"


def test_unknown_recipe(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, err = run(capsys, ["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in err and "tiny" in err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
