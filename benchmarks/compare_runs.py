"""Compare two `nestlm demo` output directories number by number (behaviour-preserving refactors).

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR

Prints the largest relative difference over every numeric field of eval.json's rows and of the
training metrics (elastic/metrics.jsonl; wall-clock fields such as tokens_per_s are skipped), and
exits 1 when it exceeds --tol (default 1e-6).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nestlm.train.checkpointer import read_metrics

WALL_CLOCK = {"tokens_per_s", "time", "elapsed_s", "seconds"}


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), 1e-12)


def _numeric(x: dict) -> dict[str, float]:
    return {
        k: v for k, v in x.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in WALL_CLOCK
    }


def compare(before: Path, after: Path) -> dict[str, float]:
    worst = {}
    ra = json.loads((before / "eval.json").read_text())["rows"]
    rb = json.loads((after / "eval.json").read_text())["rows"]
    if [r["name"] for r in ra] != [r["name"] for r in rb]:
        raise SystemExit("compare_runs: the two runs evaluated different models")
    worst["eval.json"] = max(_rel(v, y[k]) for x, y in zip(ra, rb, strict=True) for k, v in _numeric(x).items())
    ma = read_metrics(before / "elastic" / "metrics.jsonl")  # a line torn by a killed run is dropped, with a note
    mb = read_metrics(after / "elastic" / "metrics.jsonl")
    if len(ma) != len(mb):
        raise SystemExit(f"compare_runs: {len(ma)} vs {len(mb)} metric rows")
    pairs = list(zip(ma, mb, strict=True))
    worst["metrics.jsonl"] = max(_rel(v, y[k]) for x, y in pairs for k, v in _numeric(x).items())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args()
    worst = compare(args.before, args.after)
    for k, v in worst.items():
        print(f"{k:>14}: max relative difference {v:.3e}")
    sys.exit(0 if max(worst.values()) <= args.tol else 1)


if __name__ == "__main__":
    main()
