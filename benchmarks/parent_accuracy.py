"""Held-out reasoning accuracy of a model, per variant and difficulty, with 95% intervals.

    python benchmarks/parent_accuracy.py                      # the shipped parent, docs/study.md's table
    python benchmarks/parent_accuracy.py --model DIR --budget 50 --spec short:1:500 long:1:100
    python benchmarks/parent_accuracy.py --model A --outcomes a.json   # then, paired on the same problems:
    python benchmarks/compare_outcomes.py a.json b.json --model model

Each SPEC is VARIANT:DIFFICULTY:N: greedy exact match of the final answer on the first N
held-out problems (test seeds, disjoint from every training seed) of that variant and difficulty.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import nestlm
from nestlm.checkpoint import write_json
from nestlm.eval.evaluate import reasoning_accuracy
from nestlm.tasks import reasoning
from nestlm.tokenizer import ByteTokenizer

PARENT = Path(nestlm.__file__).resolve().parent / "assets" / "parent"
DEFAULT = ["short:1:500", "short:2:200", "short:3:200", "long:1:400", "long:2:200", "long:3:200"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(PARENT))
    ap.add_argument("--budget", default=None)
    ap.add_argument("--spec", nargs="+", default=DEFAULT, help="VARIANT:DIFFICULTY:N ...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument(
        "--outcomes", default=None, help="also write every problem's outcome (model 'model'), for compare_outcomes.py"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = nestlm.load(args.model).eval()
    tok = ByteTokenizer()
    out, outcomes = {}, {}
    print("| problems | difficulty | n | accuracy | 95% interval |\n|---|---|---|---|---|")
    for spec in args.spec:
        variant, d, n = reasoning.parse_spec(spec)
        t = time.time()
        r = reasoning_accuracy(model, tok, n=n, variant=variant, difficulty=d, budget=args.budget)
        lo, hi = r["ci95"]
        outcomes[f"{variant}:{d}"] = [int(c) for c in r["correct"]]
        out[f"{variant}/{d}"] = {"accuracy": r["accuracy"], "ci95": [lo, hi], "n": n, "seconds": time.time() - t}
        print(f"| {variant} | {d} | {n} | {r['accuracy']:.1%} | [{lo:.1%}, {hi:.1%}] |", flush=True)
    if args.json:
        write_json(Path(args.json), out)
    if args.outcomes:
        write_json(Path(args.outcomes), {"every": list(outcomes), "models": {"model": outcomes}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
