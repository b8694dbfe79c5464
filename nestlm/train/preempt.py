"""Preemption: a signal during ``nestlm train`` ends the run cleanly at a checkpoint.

SIGTERM or SIGUSR1 (what SLURM and most schedulers send before killing a job), or a first
Ctrl-C: the current optimizer step finishes, every rank agrees on that step (a flag is
all-reduced after each step), a checkpoint is written, one line says how to continue, and
the process exits with ``PREEMPTED_EXIT`` (75, EX_TEMPFAIL: "try again later"). More
SIGTERM/SIGUSR1 while saving change nothing (a job's processes may each get the signal more
than once); a second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from ..errors import NestlmError
from .distributed import DistInfo, all_reduce_mean

PREEMPTED_EXIT = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, run the same command again with --resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(NestlmError):
    """The run stopped at a checkpoint on a signal; ``--resume`` continues it."""

    exit_code = PREEMPTED_EXIT


class PreemptGuard:
    """Catches the preemption signals while the training loop runs (main thread only)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.interrupts = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> PreemptGuard:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
                if s != signal.SIGINT:  # restart interrupted system calls (a collective in flight) instead of failing
                    signal.siginterrupt(s, False)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            print(
                "nestlm: Ctrl-C: finishing this step and writing a checkpoint; Ctrl-C again stops at once",
                file=sys.stderr,
                flush=True,
            )
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def agreed(self, dist: DistInfo, device: torch.device) -> bool:
        """Whether any rank was signalled (all ranks get the same answer at the same step)."""
        if not dist.enabled:
            return self.signal is not None
        flag = torch.tensor(0.0 if self.signal is None else 1.0, device=device)
        return bool(all_reduce_mean(flag, dist) > 0)

    def stopped(self, checkpoint: Path | None, dist: DistInfo) -> Preempted:
        """The exception that ends the run, its message the one line users read (rank 0's only)."""
        if not dist.is_main:
            return Preempted("")
        why = self.signal or "a signal on another rank"
        return Preempted(
            f"preempted ({why}): checkpoint {checkpoint} written; continue with the same command plus --resume"
        )
