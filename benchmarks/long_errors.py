"""Where a model's worked solutions of held-out problems first go wrong, by kind of step.

    python benchmarks/long_errors.py --model DIR                       # 100 long difficulty-1 problems
    python benchmarks/long_errors.py --model DIR --spec long:1:200 short:1:200

For every problem the model gets wrong, the first byte where its greedy solution leaves the reference
solution is classed by what the model had to produce there:
  name     a variable's name where a statement or a state entry begins ("A: x = ", ". x = ", ", x = "):
           the variable a step defines or restates, copied from the question or the state before
  value    a digit or sign: a number looked up (an operand, a variable's current value) or computed
  other    anything else (an operator, punctuation, the end of the solution)
Only meaningful for a model trained on the current solution format (nestlm/tasks/reasoning.py). The
classes say what a parent needs to learn next: the name class is a copy from far back in the
question (attention over hundreds of bytes), the value class a lookup or a sum.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

import nestlm
from nestlm.eval.evaluate import reasoning_outcomes
from nestlm.tasks import reasoning
from nestlm.tokenizer import ByteTokenizer


def first_divergence(ref: str, gen: str) -> int:
    """The index of the first byte where ``gen`` leaves ``ref`` (len of the shorter when one is a prefix)."""
    n = min(len(ref), len(gen))
    return next((i for i in range(n) if ref[i] != gen[i]), n)


def kind_at(ref: str, i: int) -> str:
    """The class (name, value, other) of the reference solution's byte ``i``."""
    if i >= len(ref):
        return "other"
    c = ref[i]
    if c.isdigit() or (c == "-" and ref[i + 1 : i + 2].isdigit()):  # a number (not the operator "x - 3")
        return "value"
    if c.isalpha() and ref[i + 1 : i + 4] == " = " and (i == 3 or ref[i - 2 : i] in (". ", ": ", ", ")):
        return "name"
    return "other"


def classify(problems: list[reasoning.Problem], generations: list[str], correct: list[bool]) -> dict:
    """Counts of first-divergence classes over the wrong answers, per problem family."""
    out: dict[str, Counter] = {}
    for p, g, ok in zip(problems, generations, correct, strict=True):
        c = out.setdefault(p.family, Counter())
        c["problems"] += 1
        if ok:
            c["right"] += 1
            continue
        c[kind_at(p.cot, first_divergence(p.cot, g))] += 1
    return {fam: dict(c) for fam, c in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory")
    ap.add_argument("--spec", nargs="+", default=["long:1:100"], help="VARIANT:DIFFICULTY:N ...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the counts to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = nestlm.load(args.model).eval()
    tok = ByteTokenizer()
    res = {}
    print("| problems | family | n | right | wrong at a name | at a value | elsewhere |\n|---|---|---|---|---|---|---|")
    for spec in args.spec:
        variant, d, n = reasoning.parse_spec(spec)
        problems = reasoning.test_problems(n, variant, d)
        correct, gens = reasoning_outcomes(model, tok, problems, 25, None, None, False)
        res[spec] = classify(problems, gens, correct)
        for fam, c in sorted(res[spec].items()):
            print(
                f"| {variant}:{d} | {fam} | {c['problems']} | {c.get('right', 0)} | {c.get('name', 0)} | "
                f"{c.get('value', 0)} | {c.get('other', 0)} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
