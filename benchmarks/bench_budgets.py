"""Nested budgets of one elastic model: forward time against active FLOPs, and the cost of switching.

One run, one model (random weights, ranked and reordered by importance as every elastic
parent is; the ranking itself does not change timings). The 75% and 50% budgets are the
homogeneous ArchSpecs that ``closest_homogeneous`` picks for parameter targets 0.75 and
0.5. For each budget it reports:

* forward time: ``model(ids, arch=spec)`` (views of the full weights, no copies) under
  ``torch.inference_mode``, the median of ``--repeats`` calls after ``--warmup`` untimed
  ones, at batch ``--batch`` x ``--seq`` tokens, fp32, ``torch.set_num_threads(--threads)``;
  also the same budget physically sliced (``model.slice(spec)``, contiguous weights), to
  show what the views cost;
* its share of the full model's active FLOPs and time, and time share / FLOP share
  (goal <= 1.15: a budget should cost what its active weights cost);
* switching: every call at a budget other than the previous call's is a "first call at a
  new budget". Their median time is set against repeated calls; the bytes each call
  allocates (torch.profiler, profile_memory=True: the sum over ops of the memory they
  allocate and keep) are set against the bytes of that budget's weights; every parameter's
  storage (data_ptr) is compared before and after all switches, and the process RSS
  (/proc/self/statm) after warm-up and after all switches.

FLOP model (multiply-add = 2 FLOPs; tokens n = batch * seq; per kept layer, active widths):
  matmuls    2 * n * (weights in matmuls): Mamba in_proj D*(2*H*P + 2*G*N + H) + out_proj
             H*P*D; attention D*(nq + 2*nkv)*hd + nq*hd*D; MLP (2 or 3)*D*ffn; lm_head V*D
             (embedding lookup, norms, biases, dt/A/D vectors are not matmuls)
  attention  causal scores and values: 2 * 2 * batch * nq * hd * seq*(seq+1)/2
  conv       depthwise causal conv: 2 * n * K * (H*P + 2*G*N)
  SSD scan   chunked SSD with chunk Q (what nestlm.ssd computes), c = ceil(seq/Q) chunks:
             2*n*(G*Q*N  [C.B^T]  + H*Q*P  [intra-chunk y]  + 2*H*P*N  [chunk states, y_off])
             + 2*batch*H*P*N*(c+1)^2  [state passing across chunks]
Element-wise work (norms, gates, softplus/exp, residual adds) is left out: it is real time
but not active FLOPs, so it shows up as time share / FLOP share above 1.

The vocabulary defaults to 8192 so that the lm_head (V*D per token, never shrunk except
through the hidden size) does not dominate CPU time; ``--vocab`` changes it.

    .venv/bin/python benchmarks/bench_budgets.py            # hidden 1024, 14 layers, seq 512
    .venv/bin/python benchmarks/bench_budgets.py --quick    # small config, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

import nestlm
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, closest_homogeneous, count_parameters, parse_target

UNIT = "M-M*-M-"  # the default 14 layers are this twice: M-M*-M-M-M*-M-


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--hidden",
        type=int,
        default=1024,
        help="hidden size (Mamba heads = 2*hidden/64, attention heads = hidden/64, ffn = 3*hidden)",
    )
    p.add_argument("--layers", type=int, default=14, help=f"number of layers: the pattern {UNIT!r} repeated and cut")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--budgets", default="1.0,0.75,0.5", help="parameter fractions, largest first")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds over all budgets (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="hidden 256, 7 layers, seq 128, vocab 2048, few repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq, args.vocab = 256, 7, 128, 2048
        args.rounds, args.warmup = 5, 1
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (head_dim 64)")
    return args


def make_config(args: argparse.Namespace) -> ModelConfig:
    pattern = (UNIT * math.ceil(args.layers / len(UNIT)))[: args.layers]
    mamba_heads = 2 * args.hidden // 64  # expand 2, head_dim 64
    attn_heads = args.hidden // 64
    return ModelConfig.from_pattern(
        pattern,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        mamba_heads=mamba_heads,
        mamba_head_dim=64,
        mamba_groups=min(8, max(1, mamba_heads // 4)),
        d_state=64,
        attn_heads=attn_heads,
        kv_heads=max(1, attn_heads // 4),
        attn_head_dim=64,
        ffn=3 * args.hidden,
        mamba_chunk_size=128,
    )


# --------------------------------------------------------------------------- FLOPs
def forward_flops(config: ModelConfig, spec: ArchSpec, batch: int, seq: int) -> dict[str, float]:
    """Active FLOPs of one forward of ``spec`` over batch x seq tokens, by part (see module doc)."""
    n = batch * seq
    D = spec.hidden
    parts = {"matmul": 2.0 * n * config.vocab_size * D, "attention": 0.0, "conv": 0.0, "ssd": 0.0}
    for ls in spec.layers:
        if ls is None:
            continue
        if ls.kind == "mamba":
            H, P, G, N = ls.heads, ls.head_dim, ls.groups, ls.d_state
            Q = config.mamba_chunk_size
            c = math.ceil(seq / Q)
            parts["matmul"] += 2.0 * n * (D * (2 * H * P + 2 * G * N + H) + H * P * D)
            parts["conv"] += 2.0 * n * config.mamba_conv_kernel * (H * P + 2 * G * N)
            parts["ssd"] += 2.0 * n * (G * Q * N + H * Q * P + 2 * H * P * N) + 2.0 * batch * H * P * N * (c + 1) ** 2
        elif ls.kind == "attention":
            q, kv = ls.heads * ls.head_dim, ls.kv_heads * ls.head_dim
            parts["matmul"] += 2.0 * n * (D * (q + 2 * kv) + q * D)
            parts["attention"] += 2.0 * 2.0 * batch * q * seq * (seq + 1) / 2
        else:
            mats = 3 if config.mlp_act == "swiglu" else 2
            parts["matmul"] += 2.0 * n * mats * D * ls.ffn
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def allocated_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(bytes allocated by the ops of one call, largest single op allocation) via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.name != "[memory]" and e.self_cpu_memory_usage > 0]
    return sum(sizes), max(sizes, default=0)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def storages(model: torch.nn.Module) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    return {n: (p.untyped_storage().data_ptr(), p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()}


def mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = make_config(args)
    m0 = next(ls for ls in config.layers if ls.kind == "mamba")
    a0 = next(ls for ls in config.layers if ls.kind == "attention")
    f0 = next(ls for ls in config.layers if ls.kind == "mlp")
    print(
        f"config: pattern {config.pattern} ({config.n_layers} layers), hidden {config.hidden_size}, "
        f"mamba {m0.heads} heads x {m0.head_dim} in {m0.groups} groups, d_state {m0.d_state}, "
        f"attention {a0.heads} heads / {a0.kv_heads} kv x {a0.head_dim}, ffn {f0.ffn}, vocab {config.vocab_size}"
    )
    print(
        f"run: batch {args.batch} x seq {args.seq}, fp32, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds after {args.warmup} warm-up, medians"
    )

    load0 = load_average()
    t0 = time.perf_counter()
    model = nestlm.HybridLM(config).eval()
    calib = [torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(args.seed + 1))]
    nestlm.reorder(model, nestlm.estimate_importance(model, calib, depth=False, progress=False))
    full_params = count_parameters(config)
    print(f"model: {full_params / 1e6:.1f}M parameters; built, ranked and reordered in {time.perf_counter() - t0:.1f}s")

    budgets: dict[str, ArchSpec] = {}
    for f in (float(x) for x in args.budgets.split(",")):
        name = "full" if f == 1.0 else f"{f:.0%}"
        budgets[name] = ArchSpec.full(config) if f == 1.0 else closest_homogeneous(config, parse_target(str(f)))
        print(f"  {name:>5}: {budgets[name].describe()}")
    names = list(budgets)
    full_name = names[0]
    ids = torch.randint(
        0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 2)
    )
    flops = {name: forward_flops(config, spec, args.batch, args.seq) for name, spec in budgets.items()}
    slices = {name: model.slice(spec).eval() for name, spec in budgets.items() if not spec.is_full(config)}

    # ---- rounds: every budget twice in a row (the first call follows another budget: a switch),
    # then each physical slice twice. Ratios are taken within a round, so that a burst of load
    # from other processes on the machine hits numerator and denominator alike.
    first: dict[str, list[float]] = {n: [] for n in names}
    repeat: dict[str, list[float]] = {n: [] for n in names}
    sliced: dict[str, list[float]] = {n: [] for n in slices}
    before = storages(model)
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name in names:
                model(ids, arch=budgets[name])
            for small in slices.values():
                small(ids)
        rss0 = rss_bytes()
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[1:] + names[:1]  # vary which budget follows which
            for name in order:
                spec = budgets[name]
                first[name].append(timed(lambda spec=spec: model(ids, arch=spec)))
                repeat[name].append(timed(lambda spec=spec: model(ids, arch=spec)))
            for name, small in slices.items():
                small(ids)
                sliced[name].append(timed(lambda small=small: small(ids)))
        rss1 = rss_bytes()
        alloc: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        for i, (name, spec) in enumerate(budgets.items()):
            model(ids, arch=budgets[names[(i + 1) % len(names)]])  # the previous call ran another budget
            a_first = allocated_bytes(lambda spec=spec: model(ids, arch=spec))
            a_repeat = allocated_bytes(lambda spec=spec: model(ids, arch=spec))
            alloc[name] = (a_first, a_repeat)
        alloc_sliced = {name: allocated_bytes(lambda small=small: small(ids))[0] for name, small in slices.items()}
    same_storage = before == storages(model)
    med = statistics.median

    def share(xs: dict[str, list[float]], name: str) -> float:  # median over rounds of the per-round ratio
        return med(a / b for a, b in zip(xs[name], repeat[full_name], strict=True))

    rows = []
    for name, spec in budgets.items():
        n = spec.num_parameters(config)
        f_share = flops[name]["total"] / flops[full_name]["total"]
        t_share = share(repeat, name)
        s_ms = med(sliced[name]) * 1e3 if name in sliced else med(repeat[name]) * 1e3
        rows.append(
            [
                name,
                f"{n / 1e6:.1f}M",
                f"{n / full_params:.3f}",
                f"{flops[name]['total'] / 1e9:.1f}",
                f"{f_share:.3f}",
                f"{med(repeat[name]) * 1e3:.0f}",
                f"{min(repeat[name]) * 1e3:.0f}",
                f"{t_share:.3f}",
                f"{t_share / f_share:.3f}" + ("" if t_share / f_share <= 1.15 else " (!)"),
                f"{min(repeat[name]) / min(repeat[full_name]) / f_share:.3f}",
                f"{s_ms:.0f}",
                f"{med(repeat[name]) * 1e3 / s_ms:.3f}",
            ]
        )
    print("\nforward time by budget (nested = model(ids, arch=spec), views of the full weights;")
    print("sliced = model.slice(spec)(ids), a standalone model with contiguous weights)")
    header = ["budget", "params", "param share", "GFLOP", "FLOP share", "nested ms", "min ms", "time share"]
    print(table(rows, header + ["time/FLOP share", "same, from min", "sliced ms", "nested/sliced"]))
    parts = ["matmul", "attention", "conv", "ssd"]
    for name in names:
        print(f"  GFLOP {name:>5}: " + ", ".join(f"{k} {flops[name][k] / 1e9:.2f}" for k in parts))

    rows = []
    for name, spec in budgets.items():
        (af, af_max), (ar, ar_max) = alloc[name]
        ratio = med(a / b for a, b in zip(first[name], repeat[name], strict=True))
        rows.append(
            [
                name,
                f"{med(repeat[name]) * 1e3:.0f}",
                f"{med(first[name]) * 1e3:.0f}",
                f"{ratio:.3f}",
                mb(ar),
                mb(af),
                mb(af - ar),
                mb(max(af_max, ar_max)),
                mb(alloc_sliced[name]) if name in alloc_sliced else "-",
                mb(4 * spec.num_parameters(config)),
            ]
        )
    print(f"\nswitching budget between calls ({args.rounds} rounds: each budget right after another, then again)")
    header = ["budget", "repeated ms", "first after switch ms", "first/repeated", "alloc/call repeated MB"]
    header += ["alloc/call first MB", "difference MB", "largest alloc MB", "alloc/call sliced MB", "weights MB"]
    print(table(rows, header))
    validate_us = median_time(lambda: budgets[names[-1]].validate(config), 200, 10) * 1e6
    n_calls = sum(len(v) for v in first.values()) * 2
    print(
        f"parameter storages after {n_calls} calls across budgets: "
        f"{'unchanged' if same_storage else 'CHANGED'} ({len(before)} tensors, same data_ptr and shape); "
        f"process RSS {mb(rss0)} MB after warm-up, {mb(rss1)} MB after the rounds ({(rss1 - rss0) / 2**20:+.1f} MB, "
        f"the physical slices included in both); a switch itself is an ArchSpec check of {validate_us:.0f} us"
    )
    print(
        "(alloc/call: bytes the ops of one forward allocate (activations, logits; torch.profiler); largest alloc: "
        "the biggest single one; sliced: the same budget as a standalone model, whose weights are contiguous)"
    )
    print(
        f"machine load average (1 min) {load0} at the start, {load_average()} at the end, on "
        f"{os.cpu_count()} CPUs: other processes on the machine inflate wall times; time share is the median "
        "of per-round ratios, 'same, from min' uses each budget's fastest call"
    )


if __name__ == "__main__":
    main()
