"""Several budgets in one generation: speculative decoding with a nested draft, and think small / answer big.

Four sections, one JSON report (``--out``) and the markdown tables benchmarks/README.md shows:

(a) cost: the decode step of a draft against its target's, and the verify forward of k + 1
    tokens, on random-weight hybrids from the demo's size (~2.5M) up to a few hundred million
    parameters, batch 1, a context of ``--context`` tokens, fp32, ``--threads`` threads. Drafts:
    the 50% budget's width (``closest_homogeneous``, every layer kept: *narrower*) and the full
    width with every other Mamba / MLP layer dropped (*shallower*). c = draft step / target step,
    v = verify / target step (v (step loop): the same verify with every Mamba layer's per-token
    states made by the k + 1 one-token steps instead of nestlm.ssd_steps' quadratic form).
    The predicted speed-up over plain greedy decoding is
    (1 - a^(k+1)) / ((1 - a)(k c + v)) [Leviathan et al.], for the acceptance rate a measured in
    (b) and for a = 0.8 (labelled: an assumed rate, a prediction from measured costs only).
(b) acceptance on the trained family (``--model``, an elastic checkpoint): for each (target,
    smaller draft) pair and k in ``--ks``, greedy speculative decoding at batch 1 of ``--spec-problems``
    held-out reasoning prompts, ``--spec-tokens`` new tokens each. a is the per-token acceptance
    rate: accepted / (accepted + rounds that rejected a draft), the quantity the formula assumes.
    Measured speed-up = wall of plain greedy / wall of speculative (same prompts, identical
    output checked token for token); predicted = the formula with this a and this model's own c, v.
    Goal: measured >= 0.9 x predicted, and >= 1.5x wherever the prediction allows it.
(s) the verify scan alone (``--sections s``): nestlm.ssd_steps against k + 1 one-token steps for one
    Mamba layer, from the demo's state size to Nemotron-H-like ones (d_state 128).
(c) think small / answer big on ``--problems`` held-out problems (greedy; each answer ends at the
    newline after ``Answer:``): full throughout, 50% throughout, (50% then full), (75% then full) as
    budget schedules ``[{"budget": S, "stop": "Answer:", "max_tokens": T, "force": "Answer:"},
    {"budget": "full"}]``, and full with its thinking capped at the tokens whose active-parameter
    cost matches (50% then full)'s thinking (Star Elastic's baseline). Cost: wall time, and the sum
    over generated tokens of the active parameters of the budget that produced each (forced tokens
    cost 0). Accuracy: exact match of the first ``Answer:`` integer. Paired 95% bootstrap intervals
    of accuracy differences against full throughout (nestlm.eval.stats) and the verdict of "as
    accurate as full": held / not held / inconclusive; and against the capped full model (Star
    Elastic's comparison: budget control of the full model at the matched cost), with its verdict.

    python benchmarks/bench_generate.py --model /work/family/elastic --out /tmp/bench_generate.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

import nestlm
from nestlm import ssd_steps
from nestlm.cache import InferenceCache
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, closest_homogeneous, parse_target
from nestlm.eval.stats import paired_difference, verdict, wilson_interval
from nestlm.speculative import SpecStats
from nestlm.tasks.reasoning import extract_answer, test_problems
from nestlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROFILE = False  # --profile
DONE = re.compile(r"Answer:[^\n]*\n")


def predicted(a: float, k: int, c: float, v: float) -> float:
    if a >= 1:
        return (k + 1) / (k * c + v)
    return (1 - a ** (k + 1)) / ((1 - a) * (k * c + v))


# ------------------------------------------------------------------------------------------ (a)
def hybrid_config(hidden: int, repeat: int) -> ModelConfig:
    return ModelConfig.from_pattern(
        "M-M*-M-M*-" * repeat,
        vocab_size=259,
        hidden_size=hidden,
        mamba_heads=max(2, 2 * (hidden // 48)),  # expand ~2, a multiple of the 2 groups
        mamba_head_dim=48,
        mamba_groups=2,
        d_state=32,
        attn_heads=max(2, hidden // 32),
        kv_heads=2,
        attn_head_dim=32,
        ffn=4 * hidden,
    )


def shallower(cfg: ModelConfig) -> ArchSpec:
    """The full width with every other Mamba and MLP layer dropped (attention layers kept)."""
    drop, seen = [], {"mamba": 0, "mlp": 0}
    for i, ls in enumerate(cfg.layers):
        if ls.kind in seen:
            seen[ls.kind] += 1
            if seen[ls.kind] % 2 == 0:
                drop.append(i)
    return ArchSpec.full(cfg).replace(drop_layers=drop)


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def step_costs(model, target, draft, k: int, context: int, reps: int) -> dict[str, float]:
    """Seconds of one target step, one draft step and one verify of k + 1 tokens (keep_steps) at batch 1."""
    ids = torch.randint(3, 259, (1, context), generator=torch.Generator().manual_seed(0))

    def cache_at(arch, keep: bool) -> InferenceCache:
        c = InferenceCache(model.config.n_layers, capacity=context + 2 * (k + 1) * (reps + 2))
        model(ids, arch=arch, cache=c, num_logits=1)
        c.keep_steps = keep
        return c

    one = ids[:, :1]
    block = ids[:, : k + 1]
    tc, dc, vc = cache_at(target, False), cache_at(draft, False), cache_at(target, True)
    t = _median_time(lambda: model(one, arch=target, cache=tc, num_logits=1), reps)
    d = _median_time(lambda: model(one, arch=draft, cache=dc, num_logits=1), reps)
    v = _median_time(lambda: model(block, arch=target, cache=vc), reps)
    if PROFILE:  # the top operators of one verify forward (why v is what it is)
        from torch.profiler import profile

        with profile() as prof:
            model(block, arch=target, cache=vc)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6), flush=True)
    quad, ssd_steps.QUADRATIC_MIN = ssd_steps.QUADRATIC_MIN, float("inf")  # the same verify, states by the L-step loop
    try:
        lc = cache_at(target, True)
        v_loop = _median_time(lambda: model(block, arch=target, cache=lc), reps)
    finally:
        ssd_steps.QUADRATIC_MIN = quad
    return {"target_s": t, "draft_s": d, "verify_s": v, "c": d / t, "v": v / t, "v_loop": v_loop / t}


def section_cost(args, a_family: dict[int, float]) -> list[dict]:
    rows = []
    for hidden, repeat in args.sizes:
        cfg = hybrid_config(hidden, repeat)
        model = nestlm.HybridLM(cfg).eval()
        n = model.num_parameters()
        for name, spec in (
            ("narrower (50% width)", closest_homogeneous(cfg, parse_target("0.5"))),
            ("shallower", shallower(cfg)),
        ):
            for k in args.ks:
                cost = step_costs(model, None, spec, k, args.context, args.reps)
                row = {"params": n, "hidden": hidden, "layers": cfg.n_layers, "draft": name, "k": k}
                row |= {"draft_params": spec.num_parameters(cfg), **cost}
                row["pred_a0.8"] = predicted(0.8, k, cost["c"], cost["v"])
                if k in a_family:
                    row["pred_a_family"] = predicted(a_family[k], k, cost["c"], cost["v"])
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
    return rows


# ------------------------------------------------------------------------------------------ (s)
STATE_SHAPES = ((8, 2, 48, 32), (64, 2, 48, 32), (32, 8, 64, 64), (64, 8, 64, 128), (128, 8, 64, 128))


def section_scan(args) -> list[dict]:
    """The verify scan alone, one Mamba layer at batch 1: ssd_steps (the quadratic form above
    QUADRATIC_MIN) against the k + 1 one-token steps, (heads, groups, head_dim, d_state) from the
    demo's (8, 2, 48, 32) and the bench's 430M hybrid (64, 2, 48, 32) to Nemotron-H-like states."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for H, G, P, N in STATE_SHAPES:
        for k in args.ks:
            L = k + 1
            x, dt = torch.randn(1, L, H, P, generator=g), torch.rand(1, L, H, generator=g)
            A, D = -torch.rand(H, generator=g), torch.randn(H, generator=g)
            B, C = torch.randn(1, L, G, N, generator=g), torch.randn(1, L, G, N, generator=g)
            h = torch.randn(1, H, P, N, generator=g)

            def verify(fn, args=(h, x, dt, A, B, C, D), L=L):  # the scan, then the state a rejecting row takes
                def run():
                    _, st = fn(*args)
                    if not isinstance(st, torch.Tensor):
                        st.at(L - 1), st.at(0)
                    else:
                        st[:, L - 1], st[:, 0]

                return run

            quad = _median_time(verify(ssd_steps.ssd_steps), 4 * args.reps)
            loop = _median_time(verify(ssd_steps.ssd_steps_loop), 4 * args.reps)
            path = "quadratic" if ssd_steps.uses_quadratic(L, H, P, N) else "loop"
            row = {"state": f"{H}x{P}x{N}", "k": k, "path": path, "ssd_steps_us": 1e6 * quad, "loop_us": 1e6 * loop}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ (b)
def prompts_of(n: int, start: int = 0) -> list:
    return test_problems(n, "short", 1, start=start)


def section_acceptance(args, model) -> list[dict]:
    budgets = sorted(model.budgets, key=lambda b: -model.num_parameters(budget=b))
    pairs = [(t, d) for i, t in enumerate(budgets) for d in budgets[i + 1 :]]
    probs = prompts_of(args.spec_problems, start=10_000)
    enc = [torch.tensor([TOK.encode(p.prompt)]) for p in probs]
    rows = []
    for t, d in pairs:
        plain_wall, plain_out = 0.0, []
        for ids in enc:
            s = time.perf_counter()
            plain_out.append(model.generate(ids, max_new_tokens=args.spec_tokens, budget=t, eos_token_id=[]))
            plain_wall += time.perf_counter() - s
        for k in args.ks:
            st, wall, same = SpecStats(), 0.0, 0
            for ids, ref in zip(enc, plain_out, strict=True):
                s = time.perf_counter()
                out = model.generate(
                    ids, max_new_tokens=args.spec_tokens, budget=t, draft_budget=d, num_draft_tokens=k,
                    stats=st, eos_token_id=[],
                )  # fmt: skip
                wall += time.perf_counter() - s
                same += bool(torch.equal(out, ref))
            rejections = st.rounds_none + st.rounds_some
            a = st.accepted / max(1, st.accepted + rejections)
            cost = step_costs(model, model.budget(t).arch, model.budget(d).arch, k, 64, args.reps)
            pred = predicted(a, k, cost["c"], cost["v"])
            row = {"target": t, "draft": d, "k": k, "a": a, "accepted_fraction": st.acceptance(), "c": cost["c"]}
            row |= {"v": cost["v"], "predicted": pred, "measured": plain_wall / wall, "identical": f"{same}/{len(enc)}"}
            row |= {"rounds_none": st.rounds_none, "rounds_some": st.rounds_some, "rounds_all": st.rounds_all}
            row["goal_0.9x"] = "met" if row["measured"] >= 0.9 * pred else "missed"
            row["goal_1.5x"] = (
                "n/a (prediction < 1.5x)" if pred < 1.5 else ("met" if row["measured"] >= 1.5 else "missed")
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ (c)
def run_method(model, probs, method: dict, batch: int, params: dict[str, int], max_new: int) -> dict:
    correct, cost, tokens, wall, think = [], 0, 0, 0.0, []
    for s in range(0, len(probs), batch):
        chunk = probs[s : s + batch]
        enc = [TOK.encode(p.prompt) for p in chunk]
        L = max(len(e) for e in enc)
        ids = torch.zeros(len(enc), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, L - len(e) :], mask[i, L - len(e) :] = torch.tensor(e), 1
        per_row_budget: list[list[str]] = [[] for _ in chunk]

        def on_token(row: int, tok: int, logits, budget: str, rows: list = per_row_budget) -> None:
            rows[row].append(budget)

        def stop(new: torch.Tensor) -> torch.Tensor:
            return torch.tensor([bool(DONE.search(TOK.decode(r.tolist()))) for r in new])

        t0 = time.perf_counter()
        if "schedule" in method:
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=max_new, budget_schedule=method["schedule"],
                tokenizer=TOK, stop=stop, on_token=on_token,
            )  # fmt: skip
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, budget=method["budget"], stop=stop)
        wall += time.perf_counter() - t0
        for i, p in enumerate(chunk):
            new = out[i, L:].tolist()
            text = TOK.decode(new)
            m = DONE.search(text)
            n = len(TOK.encode(text[: m.end()])) if m else len(new)  # tokens up to the answer's newline
            correct.append(extract_answer(text) == p.answer)
            tokens += n
            if "schedule" in method:
                used = per_row_budget[i][:n]
                cost += sum(params.get(b, 0) for b in used)
                think.append(sum(1 for b in used if b == method["schedule"][0]["budget"]))
            else:
                cost += n * params[method["budget"]]
    return {"correct": correct, "cost": cost, "tokens": tokens, "wall_s": wall, "think": think}


def section_think_small(args, model) -> list[dict]:
    probs = prompts_of(args.problems)
    params = {b: model.num_parameters(budget=b) for b in model.budgets}

    def sched(small: str, cap: int) -> list[dict]:
        return [{"budget": small, "stop": "Answer:", "max_tokens": cap, "force": "Answer:"}, {"budget": "full"}]

    results = {}
    for name, method in (
        ("full", {"budget": "full"}),
        ("50%", {"budget": "50"}),
        ("50% then full", {"schedule": sched("50", args.think_cap)}),
        ("75% then full", {"schedule": sched("75", args.think_cap)}),
    ):
        results[name] = run_method(model, probs, method, args.batch, params, args.max_new)
        print(name, sum(results[name]["correct"]) / len(probs), results[name]["wall_s"], flush=True)
    small_think = statistics.mean(results["50% then full"]["think"]) * params["50"] / params["full"]
    cap = max(1, round(small_think))
    name = f"full, thinking capped at {cap}"
    results[name] = run_method(model, probs, {"schedule": sched("full", cap)}, args.batch, params, args.max_new)
    rows = []
    base, capped = results["full"], results[name]
    for name, r in results.items():
        acc = sum(r["correct"]) / len(probs)
        lo, hi = wilson_interval(sum(r["correct"]), len(probs))
        row = {"method": name, "accuracy": acc, "acc_lo": lo, "acc_hi": hi, "wall_s": r["wall_s"]}
        row |= {"active_params_per_token_sum": r["cost"], "cost_vs_full": r["cost"] / base["cost"]}
        row |= {"wall_vs_full": r["wall_s"] / base["wall_s"], "tokens": r["tokens"]}
        if name != "full":
            d = paired_difference(r["correct"], base["correct"])
            row |= {"diff": d["diff"], "diff_lo": d["lo"], "diff_hi": d["hi"], "verdict": verdict(d["lo"], d["hi"])}
        if r is not capped:  # Star Elastic's comparison: against the full model's budget control at matched cost
            d = paired_difference(r["correct"], capped["correct"])
            row |= {"vs_capped": d["diff"], "vs_capped_lo": d["lo"], "vs_capped_hi": d["hi"]}
            row["vs_capped_verdict"] = verdict(d["lo"], d["hi"])
        row["correct"] = list(r["correct"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _head(*cols: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _pp(d: float, lo: float, hi: float) -> str:
    """A paired difference with its interval, in percentage points."""
    return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def tables(report: dict) -> str:
    """The markdown tables of a report (what benchmarks/README.md shows)."""
    out = []
    if "acceptance" in report:
        cols = ["target", "draft", "k", "a", "c", "v", "predicted", "measured", "identical", ">= 0.9x pred"]
        out += _head(*cols, ">= 1.5x")
        for r in report["acceptance"]:
            out.append(
                f"| {r['target']} | {r['draft']} | {r['k']} | {r['a']:.3f} | {r['c']:.2f} | {r['v']:.2f} | "
                f"{r['predicted']:.2f}x | {r['measured']:.2f}x | {r['identical']} | {r['goal_0.9x']} | "
                f"{r['goal_1.5x']} |"
            )
        out.append("")
    if "cost" in report:
        out += _head(
            "params",
            "layers",
            "draft",
            "draft params",
            "k",
            "target ms",
            "c",
            "v",
            "v (step loop)",
            "pred. (family a)",
            "pred. (a=0.8)",
        )
        for r in report["cost"]:
            fam = f"{r['pred_a_family']:.2f}x" if "pred_a_family" in r else "-"
            vl = f"{r['v_loop']:.2f}" if "v_loop" in r else "-"  # reports from before the quadratic verify
            out.append(
                f"| {r['params'] / 1e6:.1f}M | {r['layers']} | {r['draft']} | {r['draft_params'] / 1e6:.1f}M | "
                f"{r['k']} | "
                f"{1000 * r['target_s']:.2f} | {r['c']:.2f} | {r['v']:.2f} | {vl} | {fam} | {r['pred_a0.8']:.2f}x |"
            )
        out.append("")
    if "scan" in report:
        out += _head("state (heads x head_dim x d_state)", "k", "path taken", "ssd_steps us", "k + 1 steps us", "ratio")
        for r in report["scan"]:
            out.append(
                f"| {r['state']} | {r['k']} | {r['path']} | {r['ssd_steps_us']:.0f} | {r['loop_us']:.0f} | "
                f"{r['loop_us'] / r['ssd_steps_us']:.2f}x |"
            )
        out.append("")
    if "think_small" in report:
        out += _head(
            "method",
            "accuracy [95% CI]",
            "vs full [paired 95% CI]",
            "verdict",
            "vs capped full [paired]",
            "verdict",
            "cost vs full",
            "wall vs full",
        )
        for r in report["think_small"]:
            diff = _pp(r["diff"], r["diff_lo"], r["diff_hi"]) if "diff" in r else "-"
            cap = _pp(r["vs_capped"], r["vs_capped_lo"], r["vs_capped_hi"]) if "vs_capped" in r else "-"
            out.append(
                f"| {r['method']} | {100 * r['accuracy']:.1f}% [{100 * r['acc_lo']:.1f}, {100 * r['acc_hi']:.1f}] | "
                f"{diff} | {r.get('verdict', '-')} | {cap} | {r.get('vs_capped_verdict', '-')} | "
                f"{r['cost_vs_full']:.2f} | {r['wall_vs_full']:.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="/work/family/elastic", help="an elastic checkpoint directory (the trained family)"
    )
    ap.add_argument("--out", default="bench_generate.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sizes", default="192x1,512x1,1024x2,1536x3", help="hidden x pattern repeats (10 layers each)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--spec-problems", type=int, default=4)
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--max-new", type=int, default=200)
    ap.add_argument("--think-cap", type=int, default=160, help="max_tokens of a schedule's thinking phase")
    ap.add_argument("--sections", default="b,a,c")
    ap.add_argument("--resume", metavar="REPORT", help="keep the sections of this earlier report that are not rerun")
    ap.add_argument("--tables", metavar="REPORT", help="print the markdown tables of a report written before, and exit")
    ap.add_argument("--profile", action="store_true", help="(a): print the top operators of each verify forward")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    args.sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nestlm.load(args.model).eval()
    report: dict = {"machine": f"CPU, {args.threads} thread(s)", "args": {k: v for k, v in vars(args).items()}}
    secs = args.sections.split(",")
    if args.resume:  # sections of an earlier report that this run does not redo
        report |= {k: v for k, v in json.loads(Path(args.resume).read_text()).items() if k not in ("args", "machine")}
    a_family: dict[int, float] = {}
    if "b" in secs:
        report["acceptance"] = section_acceptance(args, model)
        Path(args.out).write_text(json.dumps(report, indent=1))
    for r in report.get("acceptance", []):
        if r["draft"] == "50" and r["target"] == "full":
            a_family[r["k"]] = r["a"]
    if "a" in secs:
        report["cost"] = section_cost(args, a_family)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if "s" in secs:
        report["scan"] = section_scan(args)
    if "c" in secs:
        report["think_small"] = section_think_small(args, model)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(tables(report))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
