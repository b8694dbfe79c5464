"""Two study runs compared problem by problem: one model of each, paired on the same held-out problems.

    python benchmarks/compare_outcomes.py A/outcomes.json B/outcomes.json --model elastic/50
    python benchmarks/compare_outcomes.py A/outcomes.json B/outcomes.json --model elastic/50 --model-b kd/50

``outcomes.json`` is what ``benchmarks/paper_in_small.py`` writes (every model's per-problem outcomes,
each seed's side by side). Both runs must have scored the same problem sets with the same number of
seeds, so that outcome i is one problem under one seed in both: a variant of the study (another
learning rate, another recipe) is then judged against another by the paired interval of A - B and the
two verdict rules of nestlm/eval/stats.py, never by the two point estimates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nestlm.eval.stats import paired_comparison


def compare(a: dict[str, Any], b: dict[str, Any], model: str, model_b: str | None = None) -> list[dict[str, Any]]:
    """One row per problem set both models were scored on: accuracies, A - B with its paired interval, verdicts."""
    ma, mb = a["models"].get(model), b["models"].get(model_b or model)
    if ma is None or mb is None:
        missing = model if ma is None else model_b or model
        known = ", ".join(sorted(a["models"] if ma is None else b["models"]))
        raise SystemExit(f"compare_outcomes: no model {missing!r} in that outcomes file (it has: {known})")
    rows = []
    for s in a["every"]:
        if s not in ma or s not in mb:
            continue
        if len(ma[s]) != len(mb[s]):
            raise SystemExit(
                f"compare_outcomes: {s}: {len(ma[s])} outcomes in A, {len(mb[s])} in B; pairs need the same "
                "problems and seeds (the same --n, --n-long, --n-hard and --seeds)"
            )
        rows.append(
            {"set": s, "a": sum(ma[s]) / len(ma[s]), "b": sum(mb[s]) / len(mb[s])} | paired_comparison(ma[s], mb[s])
        )
    return rows


def read(path: str) -> dict[str, Any]:
    """An outcomes file, or one line saying why it cannot be read."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"compare_outcomes: cannot read {path}: {e}") from None
    if not isinstance(d, dict) or "every" not in d or "models" not in d:
        raise SystemExit(f"compare_outcomes: {path} is not an outcomes file (paper_in_small.py or parent_accuracy.py)")
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="outcomes.json of run A")
    ap.add_argument("b", help="outcomes.json of run B")
    ap.add_argument("--model", required=True, help="the model of A (and of B unless --model-b), e.g. elastic/50")
    ap.add_argument("--model-b", default=None, help="the model of B, when it is another")
    args = ap.parse_args(argv)
    a, b = (read(p) for p in (args.a, args.b))
    rows = compare(a, b, args.model, args.model_b)
    print(f"A: {args.model} of {args.a}; B: {args.model_b or args.model} of {args.b}")
    print("| problems:difficulty | n | A | B | A - B [95% paired] | better | non-inferior (3 pts) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['n']} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} "
            f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['better']} | {r['non_inferior']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
