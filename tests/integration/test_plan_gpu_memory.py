"""`nestlm train RECIPE --dry-run`: exit status 3 when a stage does not fit, --gpu-memory for other GPU sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nestlm.cli import main

RECIPE = str(Path(__file__).resolve().parents[2] / "nestlm" / "recipes" / "nemotron-nano-12b-v2-elastic.yaml")
PLAN = ["train", RECIPE, "--dry-run", "--world-size", "64", "train.context_parallel=1"]


def test_a_stage_that_does_not_fit_is_exit_3_and_gpu_memory_plans_for_other_gpus(capsys: pytest.CaptureFixture):
    assert main(PLAN) == 3  # stage 2 (49K tokens, no context parallelism) needs more than 80 - 8 GiB per rank
    out, err = capsys.readouterr()
    assert "at world size 64 on 80 GiB GPUs" in out and out.count("in 80 GiB (keeping 8 GiB spare)") == 2
    assert err.splitlines() == [
        "nestlm: stage 2 (long-context) does not fit in 80 GiB per GPU at world size 64 (exit status 3; see the plan "
        "above)"
    ]
    assert main([*PLAN, "--gpu-memory", "141"]) == 0  # an H200
    out, err = capsys.readouterr()
    assert "on 141 GiB GPUs" in out and out.count("-> fits in 141 GiB") == 2 and err == ""
    assert main([*PLAN, "--gpu-memory", "24"]) == 3
    out, err = capsys.readouterr()
    assert out.count("-> does NOT fit in 24 GiB") == 2
    assert "stage 1 (short-context), 2 (long-context) does not fit in 24 GiB per GPU" in err


@pytest.mark.parametrize("value", ["8", "0", "-80", "nan", "inf"])
def test_a_bad_gpu_memory_is_one_line_exit_2(capsys: pytest.CaptureFixture, value: str) -> None:
    assert main([*PLAN, "--gpu-memory", value]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"nestlm: error: --gpu-memory {float(value)}")
    assert "out of range: give GiB > 8" in lines[0]


def test_help_documents_exit_3(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory GIB" in out and "(default: 80.0)" in out and "3 when one does not" in out
