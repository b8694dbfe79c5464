"""Sharded training checkpoints under torchrun (issue 12, must-hold 3): two gloo processes, minutes on 2 cores.

- SIGKILL after a checkpoint, ``--resume`` in two processes: the losses of an uninterrupted run (<= 1e-6)
- a checkpoint written by two processes resumes in one, and one written by one resumes in two
- each rank's shard file holds about half of the model and optimizer state
- every checkpoint of ``ddp_run`` was saved with full-state gathers made to raise (no_gather_worker.py)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nestlm
from nestlm.cli import main

from .conftest import RUN_ARGS, WORKER, torchrun

pytestmark = pytest.mark.slow
TRAIN = ["train", "tiny", "--no-progress", *RUN_ARGS]


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def max_diff(a: Path, b: Path) -> float:
    x, y = losses(a), losses(b)
    assert [r["budget"] for r in x] == [r["budget"] for r in y]
    return max(abs(p["loss"] - q["loss"]) for p, q in zip(x, y, strict=True))


def killed_after(cmd: list[str], out: Path, step: int) -> None:
    """Run ``cmd`` in its own process group; SIGKILL all of it once checkpoint ``step`` is complete."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done = out / "checkpoints" / f"step-{step:08d}" / "state.json"
    t0 = time.time()
    while not done.is_file():
        if proc.poll() is not None:
            raise AssertionError("the run ended first: " + proc.stderr.read()[-2000:])
        assert time.time() - t0 < 900, "timed out"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def ddp_killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-process run killed (SIGKILL, every process) after its step-20 checkpoint."""
    out = tmp_path_factory.mktemp("ddp-killed") / "run"
    killed_after(torchrun([*TRAIN, "--out", str(out)]), out, 20)
    return out


def test_two_process_resume_after_sigkill_is_exact(ddp_run: Path, ddp_killed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(ddp_killed, out)
    res = subprocess.run(torchrun([*TRAIN, "--out", str(out), "--resume"]), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DTensor" not in res.stderr
    assert max_diff(ddp_run, out) <= 1e-6
    model = nestlm.load(out)
    assert model.budgets == ["full", "75", "50"]


def test_two_process_checkpoint_resumes_in_one(ddp_run: Path, ddp_killed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(ddp_killed, out)
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0
    assert max_diff(ddp_run, out) <= 1e-4  # one process and two agree to reduction order


def test_one_process_checkpoint_resumes_in_two(solo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed_after([sys.executable, "-m", "nestlm", *TRAIN, "--out", str(out)], out, 20)
    res = subprocess.run(torchrun([*TRAIN, "--out", str(out), "--resume"]), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert max_diff(solo_run, out) <= 1e-4


def test_each_rank_writes_about_half_and_no_rank_gathers(ddp_run: Path) -> None:
    """The fixture's saves ran with DTensor.full_tensor and full_state_dict raising, so nothing was gathered."""
    assert WORKER.is_file()
    model = nestlm.load(ddp_run)
    n_params = sum(p.numel() for p in model.parameters())
    for ck in sorted((ddp_run / "checkpoints").glob("step-*")):
        shards = sorted((ck / "dcp").glob("__*_0.distcp"))
        assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
        sizes = [p.stat().st_size for p in shards]
        total = sum(sizes)
        # weights + two AdamW moments in fp32 (and the small replicated routers, written once)
        assert total >= 3 * 4 * n_params
        for s in sizes:
            assert 0.35 <= s / total <= 0.65, (ck.name, sizes)
