"""Runs shared by the checkpoint and fault tests: the tiny recipe on one thread, one and two processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train

RUN_ARGS = ["data.max_bytes=150000", "train.checkpoint_every=5", "train.threads=1"]
WORKER = Path(__file__).with_name("no_gather_worker.py")


def torchrun(args: list[str], script: Path | None = None) -> list[str]:
    """`torchrun --nproc-per-node 2` of ``nestlm ARGS`` (or of ``script ARGS``), on a free port.

    A signalled torchrun waits up to --shutdown-timeout for its workers to save (30 s by default:
    too short on a loaded 2-core machine)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    head += ["--shutdown-timeout", "600"]
    return [*head, str(script), *args] if script else [*head, "-m", "nestlm", *args]


@pytest.fixture(scope="session")
def solo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("solo") / "run"
    train(load_recipe("tiny", RUN_ARGS), out, progress=False)
    return out


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with two gloo processes, whose checkpoints were saved with full-state gathers raising."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    cmd = torchrun(["train", "tiny", "--no-progress", *RUN_ARGS, "--out", str(out)], script=WORKER)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- serving (test_serve*.py)
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small elastic model directory (a module that needs another defines its own)."""
    from tests.unit.test_scheduler import elastic_model, write_model_dir

    return write_model_dir(elastic_model(), tmp_path_factory.mktemp("serve") / "elastic")


@pytest.fixture(scope="module")
def model(model_dir: Path):
    import nestlm

    return nestlm.load(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir: Path, one_thread):
    """`model_dir` served on loopback (max_context 256), closed after the module."""
    from nestlm.serve.server import build_api
    from tests.integration.serving import Server

    s = Server(build_api(model_dir, max_context=256))
    yield s
    s.close()
