"""Reliability (issue 14): preemption, full or read-only disks, corrupt checkpoints, bad data mid-run.

Every run here is the tiny recipe on one thread (a few seconds of CPU each).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestlm.cli import main
from nestlm.train.preempt import PREEMPTED_EXIT, PreemptGuard
from nestlm.train.recipe import load_recipe
from tests.benchmarks import load_benchmark

from .conftest import RUN_ARGS, torchrun

ARGS = RUN_ARGS


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def max_diff(a: Path, b: Path) -> float:
    x, y = losses(a), losses(b)
    assert [r["budget"] for r in x] == [r["budget"] for r in y]
    return max(abs(p["loss"] - q["loss"]) for p, q in zip(x, y, strict=True))


def popen(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, cond, timeout: float = 900) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError("the run ended first: " + proc.stderr.read()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    """Training steps logged so far (complete lines only: the file may be mid-write)."""
    f = out / "metrics.jsonl"
    return sum('"loss"' in ln for ln in f.read_text().split("\n")[:-1]) if f.is_file() else 0


# ------------------------------------------------------------------ preemption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_run_checkpoints_exits_and_resumes_exactly(sig, solo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "tiny", "--out", str(out), "--no-progress", *ARGS]
    proc = popen([sys.executable, "-m", "nestlm", *args])
    wait_for(proc, lambda: logged_steps(out) >= 7)  # between two periodic checkpoints (5 and 10)
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)  # delivered twice (SLURM signals every process of a job): still one clean save
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "preempted" in ln]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0] and "--resume" in lines[0], err
    stopped = logged_steps(out)
    assert 7 <= stopped < 40 and (out / "checkpoints" / f"step-{stopped:08d}" / "state.json").is_file()
    assert f"step-{stopped:08d}" in lines[0]
    assert not (out / "config.json").exists()  # no final model from a preempted run
    assert main([*args, "--resume"]) == 0
    assert max_diff(solo_run, out) == 0.0


def test_guard_semantics() -> None:
    """Repeated SIGTERM/SIGUSR1 only set the flag; the second Ctrl-C raises at once; handlers are restored."""
    before = signal.getsignal(signal.SIGTERM)
    with PreemptGuard() as g:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):
            os.kill(os.getpid(), s)
        assert g.signal == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a graceful stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_under_torchrun_every_rank_saves_the_same_step(sig, ddp_run: Path, tmp_path: Path) -> None:
    """SIGTERM reaches the workers through torchrun; SIGUSR1 goes to the workers (as SLURM sends it)."""
    out = tmp_path / "run"
    args = ["train", "tiny", "--no-progress", *ARGS]
    proc = popen(torchrun([*args, "--out", str(out)]))
    wait_for(proc, lambda: logged_steps(out) >= 7)
    if sig == signal.SIGTERM:
        proc.send_signal(sig)
    else:
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in kids:
            os.kill(int(pid), sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert sum("preempted" in ln for ln in err.splitlines()) == 1, err[-3000:]
    stopped = logged_steps(out)
    ck = out / "checkpoints" / f"step-{stopped:08d}"
    assert (ck / "state.json").is_file() and len(list((ck / "dcp").glob("__*_0.distcp"))) == 2
    # resumed under torchrun, it continues as the uninterrupted two-process run did
    res = subprocess.run(torchrun([*args, "--out", str(out), "--resume"]), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert max_diff(ddp_run, out) <= 1e-6


# --------------------------------------------------------------- corrupt checkpoints
KEEP_ALL = [*ARGS, "train.keep_last=40"]  # however late the kill comes, the checkpoints before it stay


def _killed_after(out: Path, step: int) -> None:
    """A run killed (SIGKILL) right after its step-``step`` checkpoint."""
    args = ["train", "tiny", "--out", str(out), "--no-progress", *KEEP_ALL]
    proc = popen([sys.executable, "-m", "nestlm", *args])
    wait_for(proc, lambda: (out / "checkpoints" / f"step-{step:08d}" / "state.json").is_file())
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_latest_checkpoint_falls_back(damage: str, solo_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _killed_after(out, 10)
    ck = out / "checkpoints"
    for p in ck.iterdir():
        if p.name > "step-00000010":
            shutil.rmtree(p)
    shard = ck / "step-00000010" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *KEEP_ALL, "--resume"]) == 0
    said = capsys.readouterr().err
    assert "step-00000010 is corrupt" in said and "__0_0.distcp" in said, said
    assert (ck / "corrupt-step-00000010").is_dir()
    assert max_diff(solo_run, out) == 0.0  # continued from step 5, equal to the uninterrupted run


def test_no_good_checkpoint_refuses_naming_the_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _killed_after(out, 5)
    ck = out / "checkpoints"
    for p in ck.glob("step-*/rng.safetensors"):
        p.write_bytes(p.read_bytes()[:10])
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *KEEP_ALL, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no good checkpoint" in err and "rng.safetensors" in err, err


# ------------------------------------------------------------------ a torn metrics log
def test_a_torn_metrics_line_does_not_stop_a_resume(solo_run: Path, tmp_path: Path) -> None:
    """metrics.jsonl is appended in place: a run killed mid-write leaves half a line, which --resume drops
    (one note on stderr) and then continues exactly as the uninterrupted run."""
    out = tmp_path / "run"
    _killed_after(out, 10)
    f = out / "metrics.jsonl"
    with open(f, "a") as fh:  # half of a record, as a write cut off by SIGKILL or a full disk leaves it
        fh.write('{"budget": "75", "loss": 3.14159, "kd": 3.1')
    cmd = [sys.executable, "-m", "nestlm", "train", "tiny", "--out", str(out), "--no-progress", *KEEP_ALL, "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    notes = [ln for ln in res.stderr.splitlines() if "metrics.jsonl" in ln]
    assert len(notes) == 1 and "cut off mid-write" in notes[0] and notes[0].startswith("nestlm: note:"), res.stderr
    rows = losses(out)
    assert [r["step"] for r in rows] == list(range(1, len(losses(solo_run)) + 1))
    assert max_diff(solo_run, out) == 0.0  # every per-step loss equal to the uninterrupted run's
    assert f.read_text().endswith("}\n") and "3.14159" not in f.read_text()


def test_every_metrics_reader_drops_a_torn_line(tmp_path: Path, capsys) -> None:
    from nestlm.train.checkpointer import metric_lines, read_metrics

    f = tmp_path / "metrics.jsonl"
    assert read_metrics(f) == [] and capsys.readouterr().err == ""  # no file yet: no records, no note
    good = [{"step": 1, "loss": 2.5}, {"step": 1, "stage": "short", "val": {"full": 2.4}}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    f.write_text(text)
    assert read_metrics(f) == good and capsys.readouterr().err == ""
    f.write_text(text + json.dumps({"step": 2, "loss": 2.0}))  # complete, only the newline missing: kept
    assert read_metrics(f)[-1] == {"step": 2, "loss": 2.0} and capsys.readouterr().err == ""
    for torn in ('{"step": 2, "lo', "\x00" * 40, '{"step": 2, "loss": 2.0, "budget": "f\xc3'):
        f.write_bytes(text.encode() + torn.encode("latin-1"))  # cut mid-record, a zero-filled tail, mid-UTF-8
        assert read_metrics(f) == good
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "line 3" in err[0] and "cut off mid-write" in err[0], err
    f.write_text(text[:10] + "\n" + text)  # damage inside the file: dropped too, and named
    assert [r for _, r in metric_lines(f)] == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[1]" in err[0], err
    compare_runs = load_benchmark("compare_runs")  # a reader outside nestlm/
    for d in ("a", "b"):
        (tmp_path / d / "elastic").mkdir(parents=True)
        (tmp_path / d / "eval.json").write_text(json.dumps({"rows": [{"name": "full", "ppl": 3.0}]}))
        (tmp_path / d / "elastic" / "metrics.jsonl").write_text(text + ('{"step": 2, "l' if d == "b" else ""))
    assert compare_runs.compare(tmp_path / "a", tmp_path / "b") == {"eval.json": 0.0, "metrics.jsonl": 0.0}


# ------------------------------------------------------------------ I/O faults
def _fail_on(monkeypatch, target: str, code: int, match: str) -> None:
    """Make ``target`` ("os.replace" or a save function) raise OSError ``code`` for paths containing ``match``."""
    import nestlm.checkpoint as ck

    if target == "os.replace":
        real = os.replace

        def fake(src, dst, *a, **k):
            if match in str(dst):
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", fake)
    else:
        real_save = ck.save_file

        def fake_save(tensors, filename, *a, **k):
            if match in str(filename):
                raise OSError(code, os.strerror(code), str(filename))
            return real_save(tensors, filename, *a, **k)

        monkeypatch.setattr(ck, "save_file", fake_save)


@pytest.mark.parametrize(
    "target,code", [("save", errno.ENOSPC), ("os.replace", errno.EROFS), ("os.replace", errno.EACCES)]
)
def test_checkpoint_write_fault_is_one_line_and_the_previous_checkpoint_resumes(
    target: str, code: int, solo_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    args = ["train", "tiny", "--out", str(out), "--no-progress", *ARGS]
    import nestlm.train.checkpointer as ckpt

    real_finish = ckpt.Checkpointer._finish

    def finish(self, tmp, path, *a):  # the fault hits the step-10 checkpoint
        if path.name == "step-00000010":
            _fail_on(monkeypatch, target, code, "step-00000010" if target == "os.replace" else "rng")
        return real_finish(self, tmp, path, *a)

    monkeypatch.setattr(ckpt.Checkpointer, "_finish", finish)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.strerror(code) in err[0] and errno.errorcode[code] in err[0], err
    assert "last good checkpoint" in err[0] and "step-00000005" in err[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000005"], names  # nothing half-written left behind
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert max_diff(solo_run, out) == 0.0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_slice_write_fault_is_one_line_and_leaves_nothing(
    code: int, solo_run: Path, tmp_path: Path, monkeypatch, capsys
):
    dest = tmp_path / "small"
    _fail_on(
        monkeypatch,
        "save" if code == errno.ENOSPC else "os.replace",
        code,
        "small" if code != errno.ENOSPC else "model",
    )
    assert main(["slice", "--model", str(solo_run), "--budget", "50", "--out", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nestlm: error: cannot write") and os.strerror(code) in err[0], err
    assert not dest.exists() and not list(tmp_path.glob(".small*"))


def test_real_full_disk(tmp_path: Path, capsys) -> None:
    """A 3 MB tmpfs (where mounting is allowed): the run stops with one line at the first checkpoint it cannot write."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        assert main(["train", "tiny", "--out", str(out), "--no-progress", *ARGS, "train.keep_last=40"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "last good checkpoint" in err[0], err
        assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------ bad data
@pytest.mark.parametrize(
    "name,content,where",
    [
        ("a.jsonl", b'{"text": "hello"}\n' * 3 + b'{"text": broken\n', "a.jsonl line 4 is not valid JSON"),
        ("b.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "b.jsonl line 2 is not valid UTF-8"),
    ],
)
def test_bad_data_is_named_before_training(name: str, content: bytes, where: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text("some text " * 2000)
    (data / name).write_bytes(content)
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *ARGS, f"data.train={data}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and where in err[0], err
    assert not out.exists()


def test_load_names_a_bit_flipped_weight_file(solo_run: Path, tmp_path: Path, capsys) -> None:
    import nestlm
    from nestlm.errors import CheckpointError

    model_dir = tmp_path / "m"
    shutil.copytree(solo_run, model_dir, ignore=shutil.ignore_patterns("checkpoints", "parent"))
    nestlm.load(model_dir)  # intact: loads
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        nestlm.load(model_dir)
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err


# ------------------------------------------------------------- the earlier checkpoint format
def _as_single_file(run: Path, step: int) -> None:
    """Rewrite checkpoint ``step`` of ``run`` in the format written before sharded checkpoints."""
    import torch
    from safetensors.torch import save_file

    from nestlm.train.trainer import Trainer

    ck = run / "checkpoints" / f"step-{step:08d}"
    t = Trainer(load_recipe("tiny", ARGS), run, resume=True, progress=False)
    save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, str(ck / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in t.routers.state_dict().items()}, str(ck / "routers.safetensors"))
    sd = t.opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
    for pid, st in sd["state"].items():
        meta["state_keys"][str(pid)] = list(st)
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
    save_file(tensors, str(ck / "optimizer.safetensors"))
    (ck / "optimizer.json").write_text(json.dumps(meta))
    shutil.rmtree(ck / "dcp")
    (ck / "checksums.json").unlink()


def test_single_file_checkpoint_still_resumes_and_exports(solo_run: Path, tmp_path: Path) -> None:
    import torch

    import nestlm

    out = tmp_path / "run"
    shutil.copytree(solo_run, out, ignore=shutil.ignore_patterns("step-00000040"))
    _as_single_file(out, 35)
    for src, dst in ((out, "old"), (solo_run, "new")):
        step35 = str(src / "checkpoints" / "step-00000035")
        assert main(["export-checkpoint", step35, "--out", str(tmp_path / dst)]) == 0
    ids = torch.randint(3, 259, (1, 16))
    old, new = nestlm.load(tmp_path / "old"), nestlm.load(tmp_path / "new")
    with torch.no_grad():
        for b in new.budgets:
            assert torch.equal(old(ids, budget=b).logits, new(ids, budget=b).logits)
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *ARGS, "--resume"]) == 0
    assert max_diff(solo_run, out) == 0.0


def test_a_run_written_before_a_recipe_key_existed_still_resumes() -> None:
    """run.json of an older version lacks keys added since: their defaults fill in, the fingerprint matches."""
    from nestlm.train.rundir import stored_fingerprint

    recipe = load_recipe("tiny", ARGS)
    old = recipe.to_dict()
    del old["train"]["grad_clip"]  # as if grad_clip did not exist when the run started
    del old["elastic"]["tolerance"]
    assert stored_fingerprint({"recipe": old}) == recipe.fingerprint()
    old["train"]["lr"] = 0.5  # a change that matters still refuses
    assert stored_fingerprint({"recipe": old}) != recipe.fingerprint()


def test_a_plain_run_resumes_after_the_elastic_defaults_changed() -> None:
    """A plain (CE) run has no budgets or routers: new elastic defaults do not make it another run."""
    from nestlm.train.rundir import stored_fingerprint

    recipe = load_recipe("parent-long")
    old = recipe.to_dict()
    old["elastic"]["mask"], old["elastic"]["router_init"] = "hard", "random"  # the defaults when it started
    assert stored_fingerprint({"recipe": old}) == recipe.fingerprint()
    elastic = load_recipe("tiny")
    old = elastic.to_dict()
    old["elastic"]["mask"] = "hard"  # an elastic run trained with hard masks is another run
    assert stored_fingerprint({"recipe": old}) != elastic.fingerprint()
