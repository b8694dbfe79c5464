"""Training from a 1 GiB pre-tokenized dataset: resident memory vs a 10 MB one, and the resumed data position.

Writes two prepared directories under /tmp with numpy (random byte-level ids, uint16): 2^29
tokens (1 GiB) and 5 * 2^20 tokens (10 MiB); trains the tiny recipe on each in its own process
(10 steps of stage 1, 1 of stage 2, a checkpoint every 5) and prints each process's peak RSS
(VmHWM, polled every 50 ms);
then checks that a loader restored from the state saved after 5 batches of the 1 GiB data
draws the same tokens as the one that went on. Deletes everything it wrote.

    .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nestlm.train.loader import BlockLoader, PackedBlocks
from nestlm.train.shards import Prepared, write_raw


def write(path: Path, n_tokens: int) -> None:
    rng = np.random.default_rng(0)
    step = 2**26
    parts = (rng.integers(3, 259, min(step, n_tokens - i), dtype=np.uint16) for i in range(0, n_tokens, step))
    write_raw(path, parts, vocab_size=259, doc_len=4096)


def train_rss(data: Path, out: Path) -> int:
    """Peak RSS (bytes) of a `nestlm train tiny` process on ``data``."""
    cmd = [sys.executable, "-m", "nestlm", "train", "tiny", "--out", str(out), "--no-progress"]
    cmd += [f"data.train={data}", "stages.0.steps=10", "stages.1.steps=1", "train.checkpoint_every=5"]
    cmd += ["train.threads=1"]
    # the child's own high-water mark (VmHWM), polled: getrusage's ru_maxrss of a child also counts
    # what its parent held when it forked
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(hwm, int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) * 1024)
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"training on {data} failed: {proc.stderr.read().decode()[-2000:]}")
    return hwm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-tokens", type=int, default=2**29)
    ap.add_argument("--small-tokens", type=int, default=5 * 2**20)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nestlm-bench-data-", dir="/tmp"))
    try:
        big, small = root / "big", root / "small"
        write(big, a.big_tokens)
        write(small, a.small_tokens)
        mib = 2.0**-20
        rss = {}
        for name, d in (("small", small), ("big", big)):
            size = (d / "tokens-00000.bin").stat().st_size
            rss[name] = train_rss(d, root / f"run-{name}")
            print(f"{name:>5}: {size * mib:8.0f} MiB of tokens on disk, training peak RSS {rss[name] * mib:7.0f} MiB")
        r = rss["big"] / rss["small"]
        print(f"RSS big / small: {r:.3f}x (goal < 1.2x: {'met' if r < 1.2 else 'MISSED'})")

        # resume: the position saved after 5 batches gives the same next tokens from a fresh memory map
        loader = BlockLoader(PackedBlocks(Prepared(big).tokens(), 64, 0.05), 64, 8, seed=0)
        for _ in range(5):
            loader.next_batch()
        state = loader.state_dict()
        fresh = BlockLoader(PackedBlocks(Prepared(big).tokens(), 64, 0.05), 64, 8, seed=0)
        fresh.load_state_dict(state)
        same = all(torch.equal(loader.next_batch()[0], fresh.next_batch()[0]) for _ in range(3))
        print(f"resume after 5 batches of the big data at {state}: next 3 batches identical: {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
