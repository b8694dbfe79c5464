"""Learning curve of a training run: accuracy against tokens, from the run's kept step checkpoints.

    python benchmarks/parent_curve.py --run runs/parent-long --spec short:1:100 long:1:100

Each checkpoint RUN/checkpoints/step-N is turned into a model directory by `nestlm export-checkpoint`
(into --work, default RUN/curve) and scored by benchmarks/parent_accuracy.py's measure (greedy exact
match on the first n held-out problems of each VARIANT:DIFFICULTY:N). Tokens are the run's own count
(metrics.jsonl, padding included) at that step. Prints a table and writes RUN/curve/curve.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import nestlm
from nestlm.eval.evaluate import reasoning_accuracy
from nestlm.tasks import reasoning
from nestlm.tokenizer import ByteTokenizer
from nestlm.train.checkpointer import read_metrics


def tokens_at(run: Path) -> dict[int, int]:
    """Cumulative training tokens at each logged step of ``run``."""
    total, out = 0, {}
    for r in read_metrics(run / "metrics.jsonl"):
        if "loss" in r and "step" in r:
            total += int(r.get("tokens", 0))
            out[int(r["step"])] = total
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a training run directory (with checkpoints/step-N)")
    ap.add_argument("--spec", nargs="+", default=["short:1:100", "long:1:100"], help="VARIANT:DIFFICULTY:N ...")
    ap.add_argument("--work", default=None, help="where the exported models go (default RUN/curve)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs="*", default=None, help="only these steps (default: every kept one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    work = Path(args.work) if args.work else run / "curve"
    work.mkdir(parents=True, exist_ok=True)
    steps = sorted(run.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    if args.steps is not None:
        steps = [p for p in steps if int(p.name.split("-")[1]) in set(args.steps)]
    if not steps:
        raise SystemExit(f"parent_curve: {run} has no checkpoints/step-N directories")
    toks = tokens_at(run)
    rows = []
    print("| step | tokens | " + " | ".join(args.spec) + " |\n|---|---|" + "---|" * len(args.spec))
    for ck in steps:
        step = int(ck.name.split("-")[1])
        model_dir = work / ck.name
        if not model_dir.exists():
            cmd = [sys.executable, "-m", "nestlm", "export-checkpoint", str(ck), "--out", str(model_dir)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        model = nestlm.load(model_dir).eval()
        row = {"step": step, "tokens": toks.get(step)}
        for spec in args.spec:
            variant, d, n = reasoning.parse_spec(spec)
            r = reasoning_accuracy(model, ByteTokenizer(), n=n, variant=variant, difficulty=d)
            row[spec] = {"accuracy": r["accuracy"], "ci95": list(r["ci95"]), "n": n}
        rows.append(row)
        cells = " | ".join(
            f"{100 * row[s]['accuracy']:.1f}% [{100 * row[s]['ci95'][0]:.1f}, {100 * row[s]['ci95'][1]:.1f}]"
            for s in args.spec
        )
        print(f"| {step} | {row['tokens'] or '-':,} | {cells} |", flush=True)
    name = "curve.json" if args.steps is None else f"curve-{'-'.join(map(str, args.steps))}.json"
    (work / name).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
