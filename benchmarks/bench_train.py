"""Elastic training step vs a plain KD step of the standalone model of the same size.

For each budget (fractions of the parent's parameters, mapped to homogeneous ArchSpecs):
  elastic  the trainer's hard-mode step: frozen-teacher forward, the *nested* student
           forward (views of the full weights, straight-through router gates) + KD +
           budget loss, backward, AdamW step over the full model and the routers;
  sliced   the same step for the standalone sliced model: teacher forward, student
           forward + KD, backward, AdamW step over its (smaller) weights.
It prints both times, their ratio (goal <= 1.25), the teacher forward's share of the
elastic step, and memory: the bytes of the teacher (held once), the student and its
optimizer state, and the process's peak RSS.

    .venv/bin/python benchmarks/bench_train.py            # hidden 512, seq 256, batch 4
    .venv/bin/python benchmarks/bench_train.py --quick

--loss-memory instead measures the distillation loss alone (student + teacher logits from final
hidden states, KD, backward) at vocab 131072: today's full-logit loss at 1K, 2K, 4K tokens and
the chunked one (train.kd_chunk_tokens) at 4K, 16K, 64K, each case in its own subprocess. Memory
is the peak of live tensor bytes the loss allocates (forward + backward, gradients included,
inputs excluded), counted by a dispatch mode over every op; on ``--device meta`` nothing is
allocated (the sizes that do not fit this machine), on ``--device cpu`` the process's RSS
growth is printed next to it as a cross-check:

    .venv/bin/python benchmarks/bench_train.py --loss-memory --device meta
    .venv/bin/python benchmarks/bench_train.py --loss-memory --device cpu --hidden 256 --cases today:1024,chunked:4096
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import resource
import statistics
import subprocess
import sys
import time

import torch

import nestlm
from nestlm.elastic.arch import parse_target
from nestlm.elastic.router import ElasticRouters, resolve_choices
from nestlm.train.losses import Head, kd_loss


def timeit_interleaved(fns: list, warmup: int, rounds: int) -> list[float]:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) so load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def teacher_logits(teacher: nestlm.HybridLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x).logits


def elastic_step(model, teacher, routers, opt, x, arch, choice, target) -> None:
    """The trainer's hard-mode step: nested forward with straight-through gates, KD + budget loss."""
    t_logits = teacher_logits(teacher, x)
    s = routers.sample(0, tau=0.5, scale=5.0)
    s.choice = {k: v.clone() for k, v in choice.items()}
    loss = kd_loss(model(x, arch=arch, tap=routers.hard_tap(s)).logits, t_logits)
    bl, _ = routers.budget_loss(s, target)
    (loss + bl).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sliced_step(small, teacher, sopt, x) -> None:
    """A plain KD step of the standalone sliced model."""
    t_logits = teacher_logits(teacher, x)
    kd_loss(small(x).logits, t_logits).backward()
    sopt.step()
    sopt.zero_grad(set_to_none=True)


LOSS_CASES = "today:1024,today:2048,today:4096,chunked:4096,chunked:16384,chunked:65536"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def loss_case(kind: str, tokens: int, a: argparse.Namespace) -> None:
    """One case (run in its own process): prints `peak_bytes rss_growth_bytes seconds`."""
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        """Peak bytes of the storages alive after each op (those created inside the mode)."""

        def __init__(self, inputs: list[torch.Tensor]) -> None:
            super().__init__()
            self.inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in inputs}  # views of them are not new
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    ref = StorageWeakRef(st)
                    old = self.live.get(ref.cdata)
                    if ref.cdata not in self.inputs and (old is None or old[0].expired()):
                        self.live[ref.cdata] = (ref, st.nbytes())
            for k in [k for k, (r, _) in self.live.items() if r.expired()]:
                del self.live[k]
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    torch.set_num_threads(a.threads)
    dev, H, V = a.device, a.hidden, a.vocab
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:  # on meta: a shape only, nothing allocated
        return torch.empty(shape, device="meta") if dev == "meta" else torch.randn(shape, generator=g) * 0.05

    s_h, s_w = randn(1, tokens, H).requires_grad_(), randn(V, H).requires_grad_()
    t_h, t_w = randn(1, tokens, H), randn(V, H)
    y = torch.randint(0, V, (1, tokens), generator=g).to(dev)
    y[:, : tokens // 4] = -100  # a prompt: the mask is part of the work
    rss0, t0 = _rss(), time.perf_counter()
    mode = LiveBytes([s_h, s_w, t_h, t_w, y])
    with mode:
        if kind == "today":  # the trainer's path before chunking: full logits of both models, then the loss
            with torch.no_grad():
                t_logits = F.linear(t_h, t_w).float()
            loss = kd_loss(F.linear(s_h, s_w).float(), t_logits, 1.0, y if dev != "meta" else None)
        else:
            loss = kd_loss(Head(s_h, s_w, a.chunk), Head(t_h, t_w, a.chunk), 1.0, y)
        loss.backward()
    print(mode.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0, time.perf_counter() - t0)


def loss_memory(a: argparse.Namespace) -> None:
    gib = 2.0**-30
    print(
        f"KD loss peak memory: vocab {a.vocab}, hidden {a.hidden}, fp32, batch 1, chunk {a.chunk} tokens, "
        f"device {a.device}; forward + backward, each case in its own process"
    )
    print()
    print("loss    | tokens | peak tensor GiB | RSS growth GiB | seconds")
    print("--------|--------|-----------------|----------------|--------")
    peaks = {}
    for case in a.cases.split(","):
        kind, tokens = case.split(":")
        cmd = [sys.executable, __file__, "--loss-case", case, "--device", a.device, "--vocab", str(a.vocab)]
        cmd += ["--hidden", str(a.hidden), "--chunk", str(a.chunk), "--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        peak, rss, sec = int(out[0]), int(out[1]), float(out[2])
        peaks[(kind, int(tokens))] = peak
        rss_s = f"{rss * gib:14.2f}" if a.device == "cpu" else f"{'-':>14}"
        print(f"{kind:<7} | {int(tokens):>6} | {peak * gib:15.2f} | {rss_s} | {sec:7.1f}")
    print()
    if ("chunked", 16384) in peaks and ("today", 2048) in peaks:
        ok = peaks[("chunked", 16384)] < peaks[("today", 2048)]
        print(f"goal chunked@16K < today@2K: {'met' if ok else 'MISSED'}")
    if ("chunked", 4096) in peaks and ("chunked", 65536) in peaks:
        r = peaks[("chunked", 65536)] / peaks[("chunked", 4096)]
        print(f"goal chunked@64K / chunked@4K < 2: {r:.2f}x, {'met' if r < 2 else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss-memory", action="store_true", help="the KD loss's peak memory table (see above)")
    ap.add_argument("--loss-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cases", default=LOSS_CASES, help="loss-memory cases, KIND:TOKENS (today or chunked)")
    ap.add_argument("--device", default="meta", help="loss-memory device: meta (counts only), cpu")
    ap.add_argument("--chunk", type=int, default=1024, help="loss-memory: train.kd_chunk_tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--pattern", default="M-M*-M-M*-")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.loss_case or a.loss_memory:
        if a.vocab == 4096:
            a.vocab = 131072
        if a.hidden == 512:
            a.hidden = 5120  # the 12B parent's
        if a.loss_case:
            kind, tokens = a.loss_case.split(":")
            return loss_case(kind, int(tokens), a)
        return loss_memory(a)
    if a.quick:
        a.hidden, a.seq, a.batch, a.rounds, a.warmup = 128, 64, 2, 3, 1
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    H = a.hidden
    cfg = nestlm.ModelConfig.from_pattern(
        a.pattern,
        vocab_size=a.vocab,
        hidden_size=H,
        mamba_heads=max(4, H // 32),
        mamba_head_dim=64,
        mamba_groups=2,
        d_state=64,
        attn_heads=max(4, H // 64),
        kv_heads=2,
        attn_head_dim=64,
        ffn=3 * H,
        mamba_chunk_size=128,
    )
    model = nestlm.HybridLM(cfg).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    axes = {
        "hidden": [1.0, 0.875, 0.75, 0.625, 0.5],
        "mamba_heads": [1.0, 0.75, 0.5],
        "attn_heads": [1.0, 0.5],
        "mlp": [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
    }
    routers = ElasticRouters(cfg, resolve_choices(cfg, axes), n_budgets=1, d_router=64)
    opt = torch.optim.AdamW(list(model.parameters()) + list(routers.parameters()), lr=1e-5)
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    total = model.num_parameters()
    print(
        f"config: hidden {H}, pattern {a.pattern!r}, vocab {a.vocab}; {total / 1e6:.1f}M parameters; "
        f"batch {a.batch} x seq {a.seq}; fp32, {a.threads} threads; median of {a.rounds}"
    )

    rows = []
    for frac in [float(f) for f in a.budgets.split(",")]:
        # the router option per axis whose architecture is closest to the budget (what hard mode runs)
        axes_ = list(routers.choices)
        goal = frac * total
        best = min(
            itertools.product(*(range(len(routers.choices[ax])) for ax in axes_)),
            key=lambda c, axes_=axes_, goal=goal: abs(
                routers.arch({ax: torch.tensor([i]) for ax, i in zip(axes_, c, strict=True)}).num_parameters(cfg) - goal
            ),
        )
        choice = {ax: torch.tensor([i]) for ax, i in zip(axes_, best, strict=True)}
        arch = routers.arch(choice)

        small = model.slice(arch).train()
        sopt = torch.optim.AdamW(small.parameters(), lr=1e-5)
        target = parse_target(frac)
        elastic = functools.partial(elastic_step, model, teacher, routers, opt, x, arch, choice, target)
        sliced = functools.partial(sliced_step, small, teacher, sopt, x)

        t_el, t_sl, t_teacher = timeit_interleaved(
            [elastic, sliced, functools.partial(teacher_logits, teacher, x)], a.warmup, a.rounds
        )
        n = arch.num_parameters(cfg)
        rows.append((f"{frac:.2f}", n, t_el, t_sl, t_el / t_sl, t_teacher / t_el))
        del small, sopt

    print()
    print("budget | active params |  elastic step s |  sliced KD step s | elastic/sliced | teacher share")
    print("-------|---------------|-----------------|-------------------|----------------|--------------")
    for b, n, te, ts, r, share in rows:
        print(f"{b:>6} | {n / 1e6:11.2f}M | {te:15.3f} | {ts:17.3f} | {r:13.2f}x | {share:12.0%}")
    mb = 1 / 2**20
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    o_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    shared = any(p.data_ptr() == q.data_ptr() for p, q in zip(model.parameters(), teacher.parameters(), strict=True))
    print()
    print(
        f"memory: teacher {t_bytes * mb:.1f} MiB (one frozen copy, no grads, no optimizer state; "
        f"shares storage with the student: {shared}), student {p_bytes * mb:.1f} MiB, "
        f"AdamW state {o_bytes * mb:.1f} MiB; process peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    print("goal: elastic/sliced <= 1.25 at every budget")


if __name__ == "__main__":
    main()
