"""``nestlm demo``: the whole method end to end on the shipped parent, on a CPU, in minutes.

importance on the shipped parent -> two-stage elastic training for three budgets
(full, 75%, 50% of the parameters) -> frozen budgets -> standalone slices ->
evaluation of every budget and of the one-shot pruned baseline of the same size on
held-out data -> a report (markdown + PNG + JSON) and the table on the terminal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import require_new_dir, save_pretrained
from .elastic.arch import Target, closest_homogeneous, count_parameters
from .elastic.importance import calibration_batches, estimate_importance, reorder
from .errors import NestlmError
from .loading import load
from .progress import show_progress

PARENT_DIR = Path(__file__).resolve().parent / "assets" / "parent"


def _stage(msg: str) -> None:
    print(f"\n[nestlm demo] {msg}", flush=True)


def run_demo(
    out: str | Path = "nestlm-demo",
    quick: bool = False,
    progress: bool = True,
    parent: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    from .eval.evaluate import evaluate_models
    from .eval.report import print_table, write_report
    from .train.recipe import load_recipe
    from .train.trainer import train

    out = require_new_dir(out, "--out")
    parent_dir = Path(parent) if parent is not None else PARENT_DIR
    if not (parent_dir / "config.json").is_file():
        raise NestlmError(f"the parent model is missing from {parent_dir}; reinstall nestlm")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t_start = time.time()
    timings: dict[str, float] = {}
    recipe = load_recipe("demo", (["stages.0.steps=6", "stages.1.steps=4"] if quick else []) + list(overrides or []))

    # 1. importance on the shipped parent
    _stage(f"1/5 importance ranking of the parent ({parent_dir})")
    t = time.time()
    parent = load(parent_dir).eval()
    from .tokenizer import ByteTokenizer
    from .train import sources as data_mod

    tok = ByteTokenizer()
    calib = data_mod.load_tokens("reasoning:short", tok, num_problems=400, seed=recipe.data.seed)
    batches = calibration_batches(calib, 128, 64 if not quick else 16, 8)
    imp = estimate_importance(parent, batches, depth_batches=2, progress=progress)
    reorder(parent, imp)
    ranked = out / "parent-ranked"
    save_pretrained(parent, ranked)
    timings["importance"] = time.time() - t

    # 2. elastic training (two stages)
    _stage("2/5 two-stage elastic training: full, 75% and 50% budgets distilled from the frozen parent")
    t = time.time()
    recipe.model.path = str(ranked)
    elastic_dir = out / "elastic"
    train(recipe, elastic_dir, progress=show_progress(progress))  # the trainer's bar: on a terminal only
    timings["train"] = time.time() - t

    # 3. slices of every frozen budget
    _stage("3/5 slicing every frozen budget into a standalone model")
    t = time.time()
    model = load(elastic_dir).eval()
    total = count_parameters(model.config)
    models: list[dict[str, Any]] = [{"name": "parent", "kind": "parent", "path": str(ranked)}]
    for name in model.budgets:
        small = model.slice(name)
        path = out / "slices" / name
        save_pretrained(small, path)
        models.append({"name": f"elastic-{name}", "kind": "elastic", "path": str(path), "budget": name})
        print(
            f"  {name:>6}: {model.budget(name).arch.describe()}  "
            f"({sum(p.numel() for p in small.parameters()):,} params)"
        )

    # 4. the one-shot pruned baseline at the same sizes
    for name in model.budgets:
        n_params = model.budget(name).params
        if n_params >= total:
            continue
        spec = closest_homogeneous(parent.config, Target("params", n_params))
        path = out / "pruned" / name
        save_pretrained(parent.slice(spec), path)
        models.append({"name": f"pruned-{name}", "kind": "pruned", "path": str(path), "budget": name})
    timings["slice"] = time.time() - t

    # 5. evaluation on held-out data
    _stage("4/5 evaluation on held-out problems (test seeds, disjoint from training)")
    t = time.time()
    rows = evaluate_models(models, total_params=count_parameters(parent.config), quick=quick, progress=progress)
    timings["eval"] = time.time() - t

    _stage("5/5 report")
    notes = _verdicts(rows)
    timings["total"] = time.time() - t_start
    timings_json = json.dumps(timings, indent=2) + "\n"  # the report's files appear together, or none do
    extra = {"timings_s": timings, "notes": notes}
    paths = write_report(rows, out, extra=extra, title="nestlm demo", files={"timings.json": timings_json})
    print_table(rows, title="nestlm demo: held-out quality per budget")
    for line in notes:
        print(line)
    print(f"\nreport: {paths['markdown']}\nplot:   {paths['plot']}\njson:   {paths['json']}")
    print(f"elastic checkpoint: {elastic_dir}   slices: {out / 'slices'}   baselines: {out / 'pruned'}")
    print(f"total time: {timings['total'] / 60:.1f} min")
    return {"rows": rows, "paths": paths, "timings": timings}


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements comparing each elastic budget with the pruned model of its size, and full vs parent."""
    by = {r["name"]: r for r in rows}
    notes = []
    parent = by.get("parent")
    full = next((r for r in rows if r["kind"] == "elastic" and r.get("fraction", 0) >= 0.999), None)
    if parent and full:
        notes.append(
            f"- full budget vs parent: held-out ppl {full['ppl']:.3f} vs {parent['ppl']:.3f} "
            f"({(full['ppl'] / parent['ppl'] - 1):+.1%}); accuracy {_paired(full, parent)}"
        )
    for r in rows:
        if r["kind"] != "elastic":
            continue
        p = by.get(f"pruned-{r.get('budget')}")
        if p is None:
            continue
        better = r["ppl"] < p["ppl"]
        notes.append(
            f"- {r['name']} ({r['params']:,} params) vs one-shot pruned ({p['params']:,}): ppl {r['ppl']:.3f} vs "
            f"{p['ppl']:.3f}: {'elastic is better' if better else 'elastic is NOT better'}; accuracy {_paired(r, p)}"
        )
    return notes


def _paired(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Accuracy of ``a`` minus ``b`` on the same problems, with its paired 95% interval."""
    from .eval.stats import paired_difference

    if not a.get("correct") or len(a["correct"]) != len(b.get("correct") or []):
        return "not compared"
    d = paired_difference(a["correct"], b["correct"])
    return f"{100 * d['diff']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] (paired, same problems)"
