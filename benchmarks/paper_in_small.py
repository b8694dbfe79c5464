"""The paper's three claims, measured in small, from the shipped parent.

    python benchmarks/paper_in_small.py --out DIR            # CPU default: under an hour on 2 cores
    python benchmarks/paper_in_small.py --out DIR --quick    # a smoke run of a few minutes
    python benchmarks/paper_in_small.py --out DIR --device cuda --scale 8 --seeds 2

Claims (Nemotron Elastic, arXiv 2511.16664):
  1. the nested sub-models are as good as or better than compressing each size on its own
     (Minitron-style prune + distil per size) while the family costs far fewer tokens;
  2. the long-context second stage is what lifts the small budgets on long reasoning;
  3. weighted budget sampling in stage 2 (0.5/0.3/0.2, largest first) protects the full
     model, where uniform sampling hurts it.

Methods, each at every budget (full, 75%, 50% of the parent's parameters):
  elastic            one two-stage elastic run: T tokens for the whole family
  prune+KD           one-shot pruning to the elastic budget's parameter count (same ranking),
                     then distillation from the same frozen parent with T tokens for that
                     size alone (2T for the two smaller sizes)
  one-shot pruned    no training;  parent, for reference
  stage-1 only       the elastic run without its long-context stage 2 (claim 2)
  uniform stage 2    the elastic run with uniform budget sampling in stage 2 (claim 3)

Every accuracy is greedy exact match on the SAME held-out problems (test seeds) for every
method, with its 95% Wilson interval; comparisons are paired (paired bootstrap of the
per-problem differences) and give the verdict of the rule the claim's words ask for
(nestlm/eval/stats.py): claim 1 ("as good as or better") both *better* (the interval above
zero) and *non-inferior* with a 3-point margin (above -3 points); claims 2 and 3 ("lifts",
"protects") *better*. The older field ``verdict`` (held / not held / inconclusive) is the
better rule under its first names.

Writes DIR/results.json (one row per model and measurement), DIR/report.md (the tables)
and DIR/accuracy.png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import nestlm
from nestlm.eval import reasoning
from nestlm.eval.evaluate import reasoning_outcomes
from nestlm.eval.perplexity import solution_perplexity
from nestlm.eval.stats import MARGIN, paired_comparison, wilson_interval
from nestlm.tokenizer import ByteTokenizer
from nestlm.train.recipe import load_recipe

PARENT = Path(nestlm.__file__).resolve().parent / "assets" / "parent"
BUDGETS = {"full": 1.0, "75": 0.75, "50": 0.5}
SMALL = ["75", "50"]


# ----------------------------------------------------------------------------- runs
def _nestlm(args: list[str], log: Path) -> None:
    """Run ``python -m nestlm ARGS`` (its own process: clean memory, output in a log file)."""
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "nestlm", *args], stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"paper_in_small: `nestlm {' '.join(args[:3])} ...` failed (see {log}):\n" + "\n".join(tail))


def _tokens(recipe: dict[str, Any]) -> int:
    """Tokens a recipe trains on: the sum over stages of steps x batch x seq_len (padding included)."""
    return sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in recipe["stages"])


def _diff_keys(a: Any, b: Any, at: str = "") -> list[str]:
    """``key: a there, b now`` for every leaf where two recipe dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {**a, **b} for d in _diff_keys(a.get(k), b.get(k), f"{at}.{k}" if at else str(k))]
    return [] if a == b else [f"{at}: {a} there, {b} now"]


def train_recipe(d: Path, rec: dict[str, Any], label: str) -> tuple[int, float]:
    """Write ``rec`` to D.yaml beside run directory ``d`` and train it into ``d`` (log D.log); (tokens, seconds)."""
    d.parent.mkdir(parents=True, exist_ok=True)
    path = d.parent / f"{d.name}.yaml"
    if (d / "config.json").is_file() and path.is_file() and (was := yaml.safe_load(path.read_text())) != rec:
        diff = ", ".join(_diff_keys(was, rec)[:3])
        raise SystemExit(f"paper_in_small: {d} was trained from another recipe ({diff}); give another --out")
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    done = d.parent / f"{d.name}.done.json"  # (tokens, seconds) of a finished run: --resume reuses it
    if (d / "config.json").is_file():  # written last: the run finished (in an earlier, --resume'd invocation)
        if done.is_file():
            return tuple(json.loads(done.read_text()))  # type: ignore[return-value]
        seconds = (d / "config.json").stat().st_mtime - (d / "recipe.yaml").stat().st_mtime  # begun to finished
        print(f"{label}: reused ({seconds / 60:.1f} min by its files)", flush=True)
        return _tokens(rec), seconds
    t = time.time()
    print(f"{label} ({_tokens(rec):,} tokens)", flush=True)
    from nestlm.train.checkpointer import CHECKPOINTS, STATE_FILE

    resume = any((d / CHECKPOINTS).glob(f"step-*/{STATE_FILE}"))  # stopped (SIGTERM checkpoints): continue it
    _nestlm(
        ["train", str(path), "--out", str(d), "--no-progress", *(["--resume"] if resume else [])],
        d.parent / f"{d.name}.log",
    )
    done.write_text(json.dumps([_tokens(rec), time.time() - t]))
    return _tokens(rec), time.time() - t


def prune_to(ranked: Path, n_params: int, out: Path, log: Path) -> None:
    """``nestlm prune`` of the ranked parent to ``n_params`` parameters into ``out`` (kept if already there)."""
    if not out.exists():
        _nestlm(["prune", "--model", str(ranked), "--budget", str(n_params), "--out", str(out)], log)


def kd_recipe(base: dict[str, Any], pruned: Path, ranked: Path, name: str, lr: float | None = None) -> dict[str, Any]:
    """``base`` turned into distillation of the pruned model alone from the ranked parent (at ``lr``; None: the
    family's)."""
    rec = copy.deepcopy(base)
    rec["name"] = name
    if lr is not None:
        rec["train"]["lr"] = lr
    rec["model"] = {"path": str(pruned), "teacher": str(ranked)}
    rec["elastic"]["budgets"] = {"full": 1.0}
    for s in rec["stages"]:
        s["budget_probs"] = "uniform"
    return rec


def study_recipe(scale: float, quick: bool, device: str, seed: int, mix: str | None = None) -> dict[str, Any]:
    """The elastic recipe of the study: the demo's, with stage lengths scaled. ``mix`` ("1,1,2,3"): the
    difficulties the distillation data cycles through in both stages, as the parent's training did
    (None: difficulty 1 only, as the claim-1 investigation measured)."""
    r = load_recipe("demo").to_dict()
    if mix:
        r["data"]["train"] = f"reasoning:short:{mix}"
        for st in r["stages"]:
            if st.get("data"):
                st["data"] = f"{st['data'].split(':')[0]}:{st['data'].split(':')[1]}:{mix}"
    r["name"] = "paper-in-small"
    r["train"]["device"] = device
    r["train"]["seed"] = seed
    r["train"]["checkpoint_every"] = 10**6  # the study does not resume; save only the final model
    r["train"]["eval_every"] = 0
    r["data"]["seed"] = 1 + seed
    # the demo's settings (nestlm's defaults: soft masks, budget loss weight 10, routers started at the
    # sub-network that distils best, full-first stage-1 sampling); study_claim1.py pins the paper's own
    for s in r["stages"]:
        s["steps"] = 3 if quick else max(1, round(s["steps"] * scale))
        s["warmup_steps"] = min(s["warmup_steps"], max(1, s["steps"] // 10))
    return r


def train_runs(
    out: Path,
    ranked: Path,
    scale: float,
    quick: bool,
    device: str,
    seed: int,
    threads: int = 2,
    mix: str | None = None,
    claims: tuple[int, ...] = (1, 2, 3),
    lr: float | None = None,
) -> dict[str, Any]:
    """The elastic runs of one seed: two-stage weighted (every claim), uniform stage 2 (claim 3), stage 1 only
    (claim 2); at ``lr`` (None: the demo's), in run directories named by it."""
    base = study_recipe(scale, quick, device, seed, mix)
    base["train"]["threads"] = threads
    if lr is not None:
        base["train"]["lr"] = lr
    base["model"]["path"] = str(ranked)
    variants = {"elastic": base}
    uni = copy.deepcopy(base)
    uni["stages"][1]["budget_probs"] = "uniform"
    if 3 in claims:
        variants["uniform"] = uni
    s1 = copy.deepcopy(base)
    s1["stages"] = s1["stages"][:1]
    if 2 in claims:
        variants["stage1"] = s1
    runs = {}
    for name, rec in variants.items():
        d = out / f"seed{seed}" / (name if lr is None else f"{name}-lr{lr:g}")  # a sweep: beside the others
        tokens, seconds = train_recipe(d, rec, f"[study] seed {seed}: training {name}")
        runs[name] = {"dir": d, "tokens": tokens, "seconds": seconds, "recipe": rec}
    return runs


def prune_kd_runs(
    out: Path, ranked: Path, elastic_dir: Path, base: dict[str, Any], seed: int, lr: float | None = None
) -> dict[str, Any]:
    """Per size: one-shot prune to the elastic budget's parameter count, then KD from the parent with T tokens.

    Another family (another --family-lr) may freeze a budget to another parameter count: its baseline is then
    pruned and trained again, in directories named by that count; the same pruned model reuses the runs."""
    elastic = nestlm.load(elastic_dir)
    runs = {}
    for b in SMALL:
        n = elastic.num_parameters(budget=b)
        pruned = out / f"seed{seed}" / f"pruned-{b}"
        suffix = ""
        if pruned.exists():  # pruned for an earlier family: the same model if pruning to n gives its config
            again = out / f"seed{seed}" / f"pruned-{b}-{n}"
            prune_to(ranked, n, again, out / f"prune-{b}.log")
            if (again / "config.json").read_text() != (pruned / "config.json").read_text():
                pruned, suffix = again, f"-{n}"
        else:
            prune_to(ranked, n, pruned, out / f"prune-{b}.log")
        rec = kd_recipe(base, pruned, ranked, f"prune-kd-{b}", lr)
        d = out / f"seed{seed}" / (f"kd-{b}{suffix}" if lr is None else f"kd-{b}{suffix}-lr{lr:g}")
        tokens, seconds = train_recipe(d, rec, f"[study] seed {seed}: prune + KD at {b}")
        runs[b] = {"dir": d, "pruned": pruned, "tokens": tokens, "seconds": seconds}
    return runs


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Scores models on fixed held-out problem sets (the same problems for every model)."""

    def __init__(
        self,
        n: int,
        long_n: int,
        batch_size: int,
        device: str,
        max_new_tokens: int | None = None,
        hard_n: int = 0,
    ) -> None:
        self.tok = ByteTokenizer()
        self.device = torch.device(device)
        self.sets = {"short": reasoning.test_problems(n, "short", 1)}
        if long_n:
            self.sets["long"] = reasoning.test_problems(long_n, "long", 1)
        for d in (2, 3) if hard_n else ():  # "short:2", "long:3", ...: hard_n problems of difficulty d
            self.sets[f"short:{d}"] = reasoning.test_problems(hard_n, "short", d)
            if long_n:
                self.sets[f"long:{d}"] = reasoning.test_problems(min(hard_n, long_n), "long", d)
        self.ppl_problems = reasoning.test_problems(max(50, n), "short", 1)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens  # None: a cap that every reference solution fits

    def __call__(self, path: Path, budget: str | None, variants: tuple[str, ...]) -> dict[str, Any]:
        sizes = ",".join(f"{v}={len(self.sets[v])}" for v in variants if v in self.sets)  # another --n: rescored
        key = f"{path}|{budget}|{sizes}|{self.max_new_tokens}|{len(self.ppl_problems)}"
        cache = path.parent / f".scores-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if cache.is_file():  # scored in an earlier, --resume'd invocation (same problems: same arguments)
            return json.loads(cache.read_text())
        out = self._score(path, budget, variants)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # whole or absent: seeds may score in parallel
        tmp.write_text(json.dumps(out))
        os.replace(tmp, cache)
        return out

    def _score(self, path: Path, budget: str | None, variants: tuple[str, ...]) -> dict[str, Any]:
        model = nestlm.load(path).eval().to(self.device)
        b = budget if model.budgets else None
        out: dict[str, Any] = {"params": model.num_parameters(budget=b)}
        ppl = solution_perplexity(model, self.tok, self.ppl_problems, budget=b)  # solutions given questions
        out["ppl"] = ppl["ppl"]
        for v in variants:
            if v not in self.sets:
                continue
            correct, _ = reasoning_outcomes(model, self.tok, self.sets[v], self.batch_size, self.max_new_tokens, b)
            out[v] = correct
        return out


def acc_cell(correct: list[bool]) -> dict[str, Any]:
    lo, hi = wilson_interval(sum(correct), len(correct))
    return {"acc": sum(correct) / len(correct), "lo": lo, "hi": hi, "n": len(correct)}


# ----------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(c: dict[str, Any] | None) -> str:
    return "-" if c is None else f"{_pct(c['acc'])} [{_pct(c['lo'])}, {_pct(c['hi'])}]"


def _diff(d: dict[str, Any]) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def build_tables(res: dict[str, Any]) -> dict[str, Any]:
    """The three claims' tables (as data) from the scored models."""
    m = res["models"]
    cells = []  # claim 1 at every difficulty and length: each small budget vs prune+KD, full vs parent
    for b in BUDGETS:
        ref_key = f"kd/{b}" if b in SMALL else "parent"
        for v in m[f"elastic/{b}"]:
            if v in ("params", "ppl") or v not in m[ref_key]:
                continue
            cells.append(
                {
                    "budget": b,
                    "set": v if ":" in v else f"{v}:1",
                    "vs": "prune+KD" if b in SMALL else "parent",
                    "elastic": acc_cell(m[f"elastic/{b}"][v]),
                    "reference": acc_cell(m[ref_key][v]),
                    "compare": paired_comparison(m[f"elastic/{b}"][v], m[ref_key][v]),
                }
            )
    t1_rows = []
    for b in BUDGETS:
        row = {"budget": b, "params": m[f"elastic/{b}"]["params"]}
        row["elastic"] = acc_cell(m[f"elastic/{b}"]["short"])
        row["prune+KD"] = acc_cell(m[f"kd/{b}"]["short"]) if b in SMALL else None
        row["one-shot pruned"] = acc_cell(m[f"pruned/{b}"]["short"]) if b in SMALL else None
        row["parent"] = acc_cell(m["parent"]["short"]) if b == "full" else None
        ref = m[f"kd/{b}"]["short"] if b in SMALL else m["parent"]["short"]
        row["vs"] = "prune+KD" if b in SMALL else "parent"
        row["compare"] = paired_comparison(m[f"elastic/{b}"]["short"], ref)
        t1_rows.append(row)
    t2_rows = []
    for b in BUDGETS if any(k.startswith("stage1/") for k in m) else ():
        row = {"budget": b}
        for v in ("short", "long"):
            if v in m[f"elastic/{b}"]:
                row[f"stage1/{v}"] = acc_cell(m[f"stage1/{b}"][v])
                row[f"two-stage/{v}"] = acc_cell(m[f"elastic/{b}"][v])
                row[f"compare/{v}"] = paired_comparison(m[f"elastic/{b}"][v], m[f"stage1/{b}"][v])
        t2_rows.append(row)
    t3_rows = []
    for b in BUDGETS if any(k.startswith("uniform/") for k in m) else ():
        row = {"budget": b, "uniform": acc_cell(m[f"uniform/{b}"]["short"])}
        row["weighted"] = acc_cell(m[f"elastic/{b}"]["short"])
        row["compare"] = paired_comparison(m[f"elastic/{b}"]["short"], m[f"uniform/{b}"]["short"])
        if "long" in m[f"uniform/{b}"]:
            row["uniform/long"] = acc_cell(m[f"uniform/{b}"]["long"])
            row["weighted/long"] = acc_cell(m[f"elastic/{b}"]["long"])
            row["compare/long"] = paired_comparison(m[f"elastic/{b}"]["long"], m[f"uniform/{b}"]["long"])
        t3_rows.append(row)
    tok = {k: v // res["seeds"] for k, v in res["tokens"].items()}  # per seed (summed over seeds in res)
    return {
        "claim1": {
            "rows": t1_rows,
            "cells": cells,
            "tokens": {
                "elastic family": tok["elastic"],
                "prune+KD, per size": {b: tok[f"kd/{b}"] for b in SMALL},
                "prune+KD, the two sizes": sum(tok[f"kd/{b}"] for b in SMALL),
            },
        },
        "claim2": {"rows": t2_rows},
        "claim3": {"rows": t3_rows},
    }


def _sentence1(t: dict[str, Any]) -> str:
    vs = [(r["budget"], r["compare"]["non_inferior"]) for r in t["rows"] if r["vs"] == "prune+KD"]
    held = [b for b, v in vs if v == "non-inferior"]
    lost = [b for b, v in vs if v == "inferior"]
    tk = t["tokens"]
    ratio = tk["prune+KD, the two sizes"] / tk["elastic family"]
    s = (
        f"Claim 1 {'held' if len(held) == len(vs) else 'did not hold' if lost else 'was inconclusive'} here: "
        f"elastic vs prune+KD is {', '.join(f'{v} at {b}' for b, v in vs)} (non-inferiority, "
        f"{100 * MARGIN:g}-point margin, paired 95% intervals), with the family costing {ratio:.1f}x fewer "
        "tokens than the two per-size runs."
    )
    return s


def _sentence2(t: dict[str, Any]) -> str:
    parts = [f"{r['compare/long']['verdict']} at {r['budget']}" for r in t["rows"] if "compare/long" in r]
    if not parts:
        return "Claim 2 was not measured (no long problems)."
    small = next((r for r in t["rows"] if r["budget"] == "50" and "compare/long" in r), None)
    head = small["compare/long"]["verdict"] if small else "inconclusive"
    return (
        f"Claim 2 {'held' if head == 'held' else 'did not hold' if head == 'not held' else 'was inconclusive'} "
        f"at the smallest budget: two stages vs stage 1 only on long problems is {', '.join(parts)}."
    )


def _sentence3(t: dict[str, Any]) -> str:
    full = next(r for r in t["rows"] if r["budget"] == "full")
    v = full["compare"]["verdict"]
    return (
        f"Claim 3 {'held' if v == 'held' else 'did not hold' if v == 'not held' else 'was inconclusive'}: "
        f"at the full budget, weighted minus uniform stage-2 sampling is {_diff(full['compare'])} points "
        "on short problems."
    )


def write_report(out: Path, res: dict[str, Any], tables: dict[str, Any]) -> str:
    L = ["# The paper's claims in small", ""]
    L.append(
        f"Parent: {res['parent_params']:,} parameters; seeds: {res['seeds']}; wall time {res['wall_s'] / 60:.1f} min "
        f"(this invocation; training, every seed and run, reused ones by their own times: "
        f"{sum(res.get('train_seconds', {}).values()) / 60:.1f} min; scoring not counted)."
    )
    L.append(
        f"Accuracy: greedy exact match, % [95% Wilson interval], on {res['n_short']} held-out short and "
        f"{res['n_long']} long problems of difficulty 1 (the same problems for every model). "
        "Differences: paired, percentage points [95% paired bootstrap interval]."
    )
    L += ["", "## Claim 1: nested models vs compressing each size separately", ""]
    L.append(
        "| budget | params | elastic | prune+KD | one-shot pruned | parent | elastic - reference | better | "
        f"non-inferior ({100 * MARGIN:g} pts) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in tables["claim1"]["rows"]:
        L.append(
            f"| {r['budget']} | {r['params']:,} | {_cell(r['elastic'])} | {_cell(r['prune+KD'])} | "
            f"{_cell(r['one-shot pruned'])} | {_cell(r['parent'])} | {_diff(r['compare'])} vs {r['vs']} | "
            f"{r['compare']['better']} | {r['compare']['non_inferior']} |"
        )
    if tables["claim1"].get("cells"):
        L += ["", "Every difficulty and length (each small budget vs prune+KD, the full budget vs the parent):", ""]
        L.append("| budget | problems:difficulty | elastic | reference | difference | better | non-inferior |")
        L.append("|---|---|---|---|---|---|---|")
        for c in tables["claim1"]["cells"]:
            L.append(
                f"| {c['budget']} | {c['set']} | {_cell(c['elastic'])} | {_cell(c['reference'])} ({c['vs']}) | "
                f"{_diff(c['compare'])} | {c['compare']['better']} | {c['compare']['non_inferior']} |"
            )
    tk = tables["claim1"]["tokens"]
    L += [
        "",
        f"Tokens{' per seed' if res['seeds'] > 1 else ''}: elastic family {tk['elastic family']:,}; prune+KD "
        + ", ".join(f"{b}: {n:,}" for b, n in tk["prune+KD, per size"].items())
        + f" ({tk['prune+KD, the two sizes']:,} for the two sizes)."
        + (
            ""
            if "lr" not in res
            else f" Learning rates: family {res['lr']['elastic family']:g}, prune+KD {res['lr']['prune+KD']:g}."
        ),
        "",
        _sentence1(tables["claim1"]),
    ]
    if tables["claim2"]["rows"]:  # (--claims without 2: not measured)
        L += ["", "## Claim 2: the long-context stage 2", ""]
        L.append("| budget | problems | stage 1 only | two stages | two - one | better |")
        L.append("|---|---|---|---|---|---|")
        for r in tables["claim2"]["rows"]:
            for v in ("short", "long"):
                if f"compare/{v}" in r:
                    L.append(
                        f"| {r['budget']} | {v} | {_cell(r[f'stage1/{v}'])} | {_cell(r[f'two-stage/{v}'])} | "
                        f"{_diff(r[f'compare/{v}'])} | {r[f'compare/{v}']['better']} |"
                    )
        L += ["", _sentence2(tables["claim2"])]
    if tables["claim3"]["rows"]:
        L += ["", "## Claim 3: budget sampling in stage 2, full budget first", ""]
        L.append("| budget | uniform | weighted (the recipe's, full first) | weighted - uniform | better |")
        L.append("|---|---|---|---|---|")
        for r in tables["claim3"]["rows"]:
            L.append(
                f"| {r['budget']} | {_cell(r['uniform'])} | {_cell(r['weighted'])} | {_diff(r['compare'])} | "
                f"{r['compare']['better']} |"
            )
        L += ["", _sentence3(tables["claim3"]), ""]
    L.append("")
    text = "\n".join(L)
    (out / "report.md").write_text(text)
    return text


def plot(out: Path, tables: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = tables["claim1"]["rows"]
    methods = ["elastic", "prune+KD", "one-shot pruned", "parent"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, meth in enumerate(methods):
        xs, ys, errs = [], [], [[], []]
        for j, r in enumerate(rows):
            c = r[meth]
            if c is None:
                continue
            xs.append(j + (i - 1.5) * width)
            ys.append(100 * c["acc"])
            errs[0].append(max(0.0, 100 * (c["acc"] - c["lo"])))  # (float noise at 0% and 100%)
            errs[1].append(max(0.0, 100 * (c["hi"] - c["acc"])))
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=meth)
    ax.set_xticks(range(len(rows)), [r["budget"] for r in rows])
    ax.set_xlabel("budget")
    ax.set_ylabel("held-out accuracy, short problems (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--out",
        required=True,
        help="a new directory for results.json, outcomes.json (per-problem outcomes), report.md, accuracy.png",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (3 steps a stage, 24 problems)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 8 on a GPU)")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds of the elastic and per-size runs")
    ap.add_argument("--n", type=int, default=300, help="held-out short problems per cell")
    ap.add_argument("--n-long", type=int, default=300, help="held-out long problems per cell (claims 2 and 3)")
    ap.add_argument("--n-hard", type=int, default=100, help="held-out problems at difficulties 2 and 3 (claim 1)")
    ap.add_argument("--mix", default="1,1,2,3", help="difficulties the distillation data cycles through")
    ap.add_argument("--resume", action="store_true", help="reuse the finished runs and scores of --out")
    ap.add_argument(
        "--kd-lr", type=float, default=None, help="the prune + KD baseline's learning rate (default: the family's)"
    )
    ap.add_argument(
        "--family-lr", type=float, default=None, help="the elastic family's learning rate (default: the demo's)"
    )
    ap.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="train and score this seed alone, into --out, and write no report: seeds in parallel, one process\n"
        "a core, the second started once the first has printed 'scoring the parent'; then --resume --seeds N\n"
        "writes the report from their runs and scores",
    )
    ap.add_argument("--claims", default="1,2,3", help="the claims to measure (1: the family vs prune + KD per size)")
    ap.add_argument("--parent", default=str(PARENT), help="the parent model directory")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for training and scoring")
    ap.add_argument("--batch-size", type=int, default=None, help="generation batch (default: 48 on CPU, 64 on GPU)")
    args = ap.parse_args(argv)
    claims = tuple(int(c) for c in args.claims.split(","))
    if not claims or not set(claims) <= {1, 2, 3} or 1 not in claims:
        raise SystemExit(f"paper_in_small: --claims {args.claims} must list claims among 1, 2, 3, claim 1 included")
    out = Path(args.out)
    if args.only_seed is not None and not 0 <= args.only_seed < args.seeds:
        raise SystemExit(f"paper_in_small: --only-seed {args.only_seed} must be within 0..{args.seeds - 1} (--seeds)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.resume:
        raise SystemExit(
            f"paper_in_small: --out {out} exists and is not an empty directory; give a new one, or --resume "
            "(the same arguments: finished runs and scores are reused)"
        )
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    n, n_long = (24, 8) if args.quick else (args.n, args.n_long)

    ranked = out / "parent-ranked"
    print("[study] ranking the parent", flush=True)
    if not (ranked / "config.json").is_file():
        _nestlm(
            ["importance", "--model", args.parent, "--data", "reasoning:short", "--out", str(ranked)]
            + ["--seq-len", "320", "--num-samples", "16" if args.quick else "64"],
            out / "importance.log",
        )
    ev = Evaluator(
        n,
        n_long,
        batch_size=args.batch_size or (48 if args.device == "cpu" else 64),
        device=args.device,
        max_new_tokens=48 if args.quick else None,
        hard_n=8 if args.quick else args.n_hard,
    )
    models: dict[str, Any] = {}
    tokens: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def merge(key: str, scored: dict[str, Any]) -> None:
        if key not in models:
            models[key] = scored
            return
        for k in ev.sets:  # seeds: outcomes of every seed side by side (pairs stay pairs)
            if k in scored:
                models[key][k] = models[key][k] + scored[k]
        models[key]["ppl"] = (models[key]["ppl"] + scored["ppl"]) / 2

    print("[study] scoring the parent", flush=True)
    every = tuple(ev.sets)  # short and long at difficulty 1 (claims 2, 3), and 2 and 3 (claim 1's cells)
    models["parent"] = ev(ranked, None, every)
    for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
        runs = train_runs(
            out, ranked, args.scale, args.quick, args.device, seed, args.threads, args.mix, claims, args.family_lr
        )
        family_lr = runs["elastic"]["recipe"]["train"]["lr"]
        kd = prune_kd_runs(out, ranked, runs["elastic"]["dir"], runs["elastic"]["recipe"], seed, args.kd_lr)
        for name, r in runs.items():
            tokens[name] = tokens.get(name, 0) + r["tokens"]
            seconds[name] = seconds.get(name, 0.0) + r["seconds"]
        for b, r in kd.items():
            tokens[f"kd/{b}"] = tokens.get(f"kd/{b}", 0) + r["tokens"]
            seconds[f"kd/{b}"] = seconds.get(f"kd/{b}", 0.0) + r["seconds"]
        print(f"[study] seed {seed}: scoring", flush=True)
        for b in BUDGETS:
            merge(f"elastic/{b}", ev(runs["elastic"]["dir"], b, every))
            for name in ("stage1", "uniform"):
                if name in runs:
                    merge(f"{name}/{b}", ev(runs[name]["dir"], b, ("short", "long")))
        for b in SMALL:
            merge(f"kd/{b}", ev(kd[b]["dir"], None, every))
            merge(f"pruned/{b}", ev(kd[b]["pruned"], None, ("short",)))
    if args.only_seed is not None:
        done = f"[study] seed {args.only_seed} done in {(time.time() - t0) / 60:.1f} min"
        print(f"{done}; the report: --resume --seeds N", flush=True)
        return 0
    if args.seeds > 1:  # the parent and its outcomes repeat once per seed, so pairs line up
        for k in every:
            models["parent"][k] = models["parent"][k] * args.seeds
    res = {
        "parent_params": models["parent"]["params"],
        "seeds": args.seeds,
        "n_short": n,
        "n_long": n_long,
        "tokens": tokens,
        "lr": {"elastic family": family_lr, "prune+KD": args.kd_lr or family_lr},
        "train_seconds": seconds,
        "models": models,
    }
    res["wall_s"] = time.time() - t0
    tables = build_tables(res)
    rows = []
    for key, m in models.items():
        for meas in ("short", "long"):
            if meas in m:
                rows.append({"model": key, "measure": f"accuracy/{meas}", **acc_cell(m[meas])})
        rows.append({"model": key, "measure": "ppl", "value": m["ppl"], "params": m["params"]})
    for key, t in tokens.items():
        rows.append({"model": key, "measure": "tokens", "value": t, "seconds": seconds[key]})
    (out / "outcomes.json").write_text(json.dumps({"every": list(every), "models": models}))  # per problem
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "tables": tables, "wall_s": res["wall_s"], "argv": sys.argv[1:]}, indent=1)
    )
    text = write_report(out, res, tables)
    plot(out, tables)
    print(text)
    print(f"\n[study] done in {res['wall_s'] / 60:.1f} min: {out / 'report.md'}, results.json, accuracy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
