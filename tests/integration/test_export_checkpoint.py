"""`nestlm export-checkpoint`: a mid-run training checkpoint becomes a loadable elastic model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main


def test_last_checkpoint_exports_the_final_model(solo_run: Path, tmp_path: Path) -> None:
    """The step-40 checkpoint holds the final weights and routers: its export equals the finished run."""
    out = tmp_path / "m40"
    assert main(["export-checkpoint", str(solo_run / "checkpoints" / "step-00000040"), "--out", str(out)]) == 0
    model, final = nestlm.load(out), nestlm.load(solo_run)
    assert model.budgets == final.budgets == ["full", "75", "50"]
    ids = torch.randint(3, 259, (2, 24))
    with torch.no_grad():
        for name in model.budgets:
            assert model.budget(name).arch == final.budget(name).arch
            assert torch.equal(model(ids, budget=name).logits, final(ids, budget=name).logits)


def test_mid_run_checkpoint_loads_every_budget(solo_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m35"
    assert main(["export-checkpoint", str(solo_run / "checkpoints" / "step-00000035"), "--out", str(out)]) == 0
    assert "full, 75, 50" in capsys.readouterr().out
    model, final = nestlm.load(out), nestlm.load(solo_run)
    total = model.num_parameters()
    ids = torch.randint(3, 259, (1, 16))
    elastic = json.loads((out / "elastic.json").read_text())
    for name, target in (("full", 1.0), ("75", 0.75), ("50", 0.5)):
        n = model.num_parameters(budget=name)
        assert n == elastic[name]["params"] == model.slice(name).num_parameters()
        assert abs(n / (target * total) - 1) <= 0.05
    with torch.no_grad():  # weights from step 35, not the end of the run
        assert not torch.equal(model(ids).logits, final(ids).logits)


def test_not_a_checkpoint_is_one_line(solo_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export-checkpoint", str(solo_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestlm: error:") and "not a complete training checkpoint" in err
    assert not (tmp_path / "x").exists()
    missing = solo_run / "checkpoints" / "step-00009999"  # a step the run never kept: the message lists those it did
    assert main(["export-checkpoint", str(missing), "--out", str(tmp_path / "x")]) == 2
    kept = sorted(p.name for p in (solo_run / "checkpoints").glob("step-*"))
    assert kept and f"holds {', '.join(kept)}" in capsys.readouterr().err


def test_a_run_with_a_relative_model_path_exports_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """model.path=par (relative) resolved against the directory the run began in, not the exporter's."""
    import shutil

    start = tmp_path / "start"
    start.mkdir()
    shutil.copytree(Path(__file__).resolve().parent.parent / "data" / "elastic-v1", start / "par")
    monkeypatch.chdir(start)
    fast = ["data.max_bytes=60000", "stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=2"]
    argv = ["train", "tiny", "--out", "R", "--no-progress", "train.mode=plain", "model.path=par", "model.init=null"]
    assert main([*argv, *fast]) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: "par" does not resolve from here
    assert main(["export-checkpoint", str(start / "R" / "checkpoints" / "step-00000004"), "--out", "ex"]) == 0
    assert (tmp_path / "ex" / "model.safetensors").is_file()
    run = start / "R"
    for p in sorted((run / "checkpoints").iterdir())[1:]:  # keep step 4 only: the resume has work to do
        shutil.rmtree(p)
    (run / "config.json").unlink()
    assert main([*argv[:3], str(run), *argv[4:], *fast, "--resume"]) == 0  # resumed from elsewhere
    assert (run / "config.json").is_file()
