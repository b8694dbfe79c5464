"""Context parallelism on CPU: a training step's activation memory per rank and its time, at context 1, 2, 4.

One forward + backward (cross entropy) of a hybrid model (Mamba2, attention, MLP) over a long sequence,
each rank holding 1/N of it (``forward(context=...)``, train/context_parallel.py), under
``torchrun --nproc-per-node N`` on gloo. Per rank it measures

  activations  the bytes the forward keeps for the backward (every tensor autograd saves, each storage
               counted once: a saved_tensors_hooks count), at the end of the forward: the step's peak
               of activation memory without activation checkpointing; it should fall about as 1/N
  step         median wall time of a forward + backward (after one warm-up step)
  rank-s       step x N: the compute of all ranks together; its growth over context 1 is the overhead
               (communication, the parts' state algebra, attention over gathered keys). N processes
               share this machine's cores, so only rank-s is comparable across N.

    python benchmarks/bench_context_parallel.py                   # seq 8192, context 1, 2, 4
    python benchmarks/bench_context_parallel.py --seq-len 4096 --contexts 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def build(seed: int = 0):
    from nestlm.config import ModelConfig
    from nestlm.model import HybridLM

    cfg = ModelConfig.from_pattern(
        "M-M*-M-M*-",
        vocab_size=256,
        hidden_size=256,
        mamba_heads=8,
        mamba_head_dim=32,
        mamba_groups=2,
        d_state=32,
        attn_heads=8,
        kv_heads=2,
        attn_head_dim=32,
        ffn=512,
        mamba_chunk_size=64,
    )
    torch.manual_seed(seed)
    model = HybridLM(cfg)
    model.reset_parameters(seed=seed)
    return model


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward while active (weights aside)."""

    def __init__(self, weights: set[int]) -> None:
        self.seen: dict[int, int] = {}
        self.weights = weights

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self.weights:
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from nestlm.train.context_parallel import make_mesh
    from nestlm.train.distributed import DistInfo

    torch.set_num_threads(args.threads)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    cg = None
    if n > 1:
        dist.init_process_group("gloo")
        cg = make_mesh(n, DistInfo(dist.get_rank(), n, 0, "gloo")).context
    model = build()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, args.seq_len + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    if cg is not None:
        x, y = cg.part(x), cg.part(y)
    times, saved = [], None
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        count = SavedBytes(weights)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
            logits = model(x, context=cg).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        if step:
            times.append(time.perf_counter() - t0)
        saved = count.total
    out = {"n": n, "tokens": x.shape[1], "saved": saved, "step": statistics.median(times)}
    if cg is not None:
        t = torch.tensor([float(saved), out["step"]])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the largest rank (the last part holds the most keys)
        out["saved"], out["step"] = int(t[0]), float(t[1])
        dist.destroy_process_group()
    if cg is None or cg.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--contexts", default="1,2,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in (int(s) for s in args.contexts.split(",")):
        me = [__file__, "--worker", "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        me += ["--threads", str(args.threads)]
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone", *me]
        res = subprocess.run(run if n > 1 else [sys.executable, *me], capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"context {n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
    base = rows[0]
    print(
        f"one training step (forward + backward, cross entropy), sequence {args.seq_len}, hybrid M-M*-M-M*- hidden 256"
    )
    print(
        f"{'context':>7} {'tokens/rank':>11} {'activations/rank':>17} {'x of context 1':>14} {'step s':>8} "
        f"{'rank-s':>8} {'overhead':>9}"
    )
    for r in rows:
        mib = r["saved"] / 2**20
        rank_s = r["step"] * r["n"]
        over = rank_s / (base["step"] * base["n"]) - 1
        print(
            f"{r['n']:>7} {r['tokens']:>11} {mib:>13.1f} MiB {r['saved'] / base['saved']:>14.3f} "
            f"{r['step']:>8.2f} {rank_s:>8.2f} {over:>+9.0%}"
        )
    print(
        f"({os.cpu_count()} CPU cores shared by the ranks, {args.threads} thread(s) each; activations: the "
        "largest rank's, the last part)"
    )


if __name__ == "__main__":
    main()
