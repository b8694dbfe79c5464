"""Progress bars only on a terminal: a command whose stderr is a file or a pipe writes no bar and no carriage
return; on a terminal (a pseudo-terminal here) the bar is drawn unless --no-progress."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

DATA = str(Path(__file__).resolve().parent.parent / "data" / "elastic-v1")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
BAR = ("\r", "\u2588", "it/s", "s/it", "importance: width", "importance: depth", "reasoning:")


def importance(out: Path, *extra: str) -> list[str]:
    args = ["importance", "--model", DATA, "--data", "stdlib", "--max-bytes", "20000", "--seq-len", "32"]
    return [sys.executable, "-m", "nestlm", *args, "--num-samples", "8", "--batch-size", "4", "--out", str(out), *extra]


def on_a_terminal(cmd: list[str]) -> str:
    """Run ``cmd`` with stderr on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 characters
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_importance_writes_no_bar_into_a_pipe_or_a_file(tmp_path: Path) -> None:
    res = subprocess.run(importance(tmp_path / "a"), capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not any(b in res.stderr for b in BAR), repr(res.stderr)
    with open(tmp_path / "log.txt", "w") as log:
        assert subprocess.run(importance(tmp_path / "b"), stdout=log, stderr=log, env=ENV, timeout=300).returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "reordered checkpoint" in text and not any(b in text for b in BAR), repr(text)


def test_on_a_terminal_the_bar_is_drawn_unless_no_progress(tmp_path: Path) -> None:
    drawn = on_a_terminal(importance(tmp_path / "a"))
    assert "importance: width" in drawn and "\r" in drawn  # the control: tqdm draws on a terminal
    quiet = on_a_terminal(importance(tmp_path / "b", "--no-progress"))
    assert not any(b in quiet for b in BAR), repr(quiet)


@pytest.mark.parametrize("where", ["pipe", "terminal", "terminal --no-progress"])
def test_eval_draws_its_bar_on_a_terminal_only(tmp_path: Path, where: str) -> None:
    cmd = [sys.executable, "-m", "nestlm", "eval", "--model", DATA, "--budget", "50", "--out", str(tmp_path / "e")]
    cmd += ["--num-problems", "8", "--num-reasoning", "4", "--seq-len", "64"]
    if where == "pipe":
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, res.stderr
        err = res.stderr
    else:
        err = on_a_terminal([*cmd, *where.split()[1:]])
    if where == "terminal":  # the control: the reasoning bar is drawn there
        assert "reasoning:" in err and "\r" in err, repr(err)
    else:
        assert not any(b in err for b in BAR), repr(err)
