"""Elastic training end to end on the tiny recipe: losses, budgets, resume, distributed, slicing, bad input."""

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
import torch

import nestlm
import nestlm.train.data  # noqa: F401  (nestlm.train.data.load_tokens below, whatever ran before)
from nestlm.checkpoint import read_routers
from nestlm.cli import main
from nestlm.elastic.arch import parse_target
from nestlm.elastic.training import make_routers
from nestlm.train.losses import kd_loss
from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train

# the paper's router settings, which these checks were written against (nestlm's defaults start the routers at
# the sub-network that distils best, which may begin within 1e-3 nats of the teacher: "KD falls" has no room)
TINY = ["data.max_bytes=150000", "train.checkpoint_every=5"]
TINY += ["elastic.mask=hard", "elastic.budget_loss_weight=1", "elastic.router_init=random"]


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(load_recipe("tiny", TINY), out, progress=False)
    return out


def test_budgets_within_tolerance_and_kd_falls(tiny_run: Path) -> None:
    model = nestlm.load(tiny_run)
    parent = nestlm.load(tiny_run / "parent")
    assert model.budgets == ["full", "75", "50"]
    total = model.num_parameters()
    elastic = json.loads((tiny_run / "elastic.json").read_text())
    for name in ("full", "75", "50"):
        n = model.num_parameters(budget=name)
        assert n == elastic[name]["params"] == model.slice(name).num_parameters()
    # the frozen budgets are what the saved routers give (freezing read the trained routers, not others)
    recipe = load_recipe("tiny", TINY)
    routers = make_routers(model.config, recipe.elastic, 2, model.importance.layer_order)
    routers.load_state_dict(read_routers(tiny_run))
    for b, name in enumerate(("75", "50")):
        target = parse_target(recipe.elastic.budgets[name])
        assert routers.freeze(b, target, 0.05, scale=10.0) == model.budget(name).arch, name
    # KD to the frozen parent at each budget's frozen architecture: before training vs after
    torch.manual_seed(0)
    tokens = nestlm.train.data.load_tokens("stdlib", nestlm.tokenizer.ByteTokenizer(), max_bytes=40_000)
    x = tokens[-64 * 8 :].view(8, 64)
    with torch.no_grad():
        teacher = parent(x).logits
        for name in model.budgets:
            arch = model.budget(name).arch
            before = float(kd_loss(parent(x, arch=arch).logits, teacher))
            after = float(kd_loss(model(x, arch=arch).logits, teacher))
            if name == "full":
                assert before == 0.0  # the student starts as the teacher
            else:
                assert after < before, (name, before, after)
    # and the budget loss trained the routers: each routed budget's expected cost (the logged one, at
    # the step's Gumbel sample) ends nearer its target than it started, and within 3x the tolerance
    rows = losses(tiny_run)
    for name, frac in (("75", 0.75), ("50", 0.5)):
        err = [abs(r["expected_cost"] / (frac * total) - 1) for r in rows if r["budget"] == name]
        assert len(err) >= 3 and err[-1] < err[0] and err[-1] <= 0.15, (name, err)


def test_slices_equal_elastic(tiny_run: Path, tmp_path: Path) -> None:
    model = nestlm.load(tiny_run)
    ids = torch.randint(3, 259, (2, 40))
    for name in model.budgets:
        out = tmp_path / name
        assert main(["slice", "--model", str(tiny_run), "--budget", name, "--out", str(out)]) == 0
        small = nestlm.load(out)
        with torch.no_grad():
            diff = (small(ids).logits - model(ids, budget=name).logits).abs().max().item()
        assert diff <= 1e-5, (name, diff)
        assert small.num_parameters() == model.num_parameters(budget=name)


def test_metrics_file_has_required_fields(tiny_run: Path) -> None:
    rows = losses(tiny_run)
    assert len(rows) == 40
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:
        assert {"step", "stage", "budget", "loss"} <= set(r)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "nestlm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed: " + proc.stderr.read()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting to kill the run")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_is_exact(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["train", "tiny", "--out", str(out), "--no-progress", *TINY]
    proc = _run_cli(args)
    _kill_when(proc, lambda: (out / "checkpoints" / "step-00000020" / "state.json").is_file())
    assert main([*args, "--resume"]) == 0
    a, b = losses(tiny_run), losses(out)
    assert [r["budget"] for r in a] == [r["budget"] for r in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6


def test_kill_while_writing_a_checkpoint_keeps_the_good_one(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "midwrite"
    args = ["train", "tiny", "--out", str(out), "--no-progress", *TINY]
    proc = _run_cli(args)
    ck = out / "checkpoints"

    def writing_after_first() -> bool:  # a temporary checkpoint dir exists next to a complete one
        if not ck.is_dir():
            return False
        names = [p.name for p in ck.iterdir()]
        return any(n.startswith(".step-") for n in names) and any(n.startswith("step-") for n in names)

    _kill_when(proc, writing_after_first)
    complete = sorted(p.name for p in ck.iterdir() if p.name.startswith("step-"))
    assert complete and all((ck / n / "state.json").is_file() for n in complete)
    assert main([*args, "--resume"]) == 0
    assert not any(p.name.startswith(".") for p in ck.iterdir())
    a, b = losses(tiny_run), losses(out)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6


def test_two_process_gloo_matches_one_process(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",  # a free rendezvous port, so parallel runs cannot collide
        "-m",
        "nestlm",
        "train",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        *TINY,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "exitcode: -11" in res.stderr:
        # a worker segfaulted inside gloo once on a heavily loaded 2-core machine: retry once, a
        # second crash fails the test
        shutil.rmtree(out, ignore_errors=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = losses(tiny_run), losses(out)
    assert [r["budget"] for r in a] == [r["budget"] for r in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-4
