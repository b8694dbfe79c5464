"""Under torchrun: one forward and backward with context parallelism against one process, for several models.

Every rank builds the same models (same seeds), runs the whole sequences itself (the one-process
reference) and then its part of them through ``forward(context=...)``, and compares: the part's
logits, the gradient of the first block's input (the "input gradient", every token and channel),
and every parameter's and soft mask's gradient (summed over the group: a weight used on every rank
gets its gradient from every rank). Rank 0 prints one JSON line of the largest differences (``rel``:
absolute below 1, relative above); the exit status says whether all are within ``--tol``.

    torchrun --nproc-per-node N tests/integration/cp_worker.py --lengths 22,10
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.distributed as dist

from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec
from nestlm.model import HybridLM
from nestlm.tap import Tap
from nestlm.train.context_parallel import make_mesh
from nestlm.train.distributed import DistInfo

SMALL = dict(vocab_size=97, hidden_size=32, mamba_heads=4, mamba_head_dim=8, mamba_groups=2, d_state=8)
SMALL |= dict(attn_heads=4, kv_heads=2, attn_head_dim=8, ffn=48, mamba_chunk_size=8, init_std=0.06)


class Probe(Tap):
    """Keeps the first block's input for its gradient; optionally soft masks (hidden, Mamba heads, MLP)."""

    def __init__(self, cfg: ModelConfig, masks: bool) -> None:
        g = torch.Generator().manual_seed(5)
        self.masks: dict[str, torch.Tensor] = {}
        if masks:
            hp = max(ls.heads * ls.head_dim for ls in cfg.layers if ls.kind == "mamba")
            ffn = max(ls.ffn for ls in cfg.layers if ls.kind == "mlp")
            for name, n in (("hidden", cfg.hidden_size), ("mamba_heads", hp), ("mlp_act", ffn)):
                self.masks[name] = torch.rand(n, generator=g).add_(0.2).clamp_(max=1.0).requires_grad_()
        self.first: torch.Tensor | None = None

    def activation(self, layer: int, name: str, t: torch.Tensor) -> torch.Tensor:
        if layer == 0 and name == "norm":
            t.retain_grad()
            self.first = t
        if name == "mamba_heads" and name in self.masks:
            return self.masks[name][: t.shape[0]]
        if name == "mlp_act" and name in self.masks:
            return t * self.masks[name][: t.shape[-1]]
        return t

    def hidden_mask(self) -> torch.Tensor | None:
        return self.masks.get("hidden")


def segments(L: int, n: int) -> torch.Tensor:
    """(2, L) packed documents: row 0 starts documents at the first part boundary, 3 tokens after it and
    2 before the end (documents across the later boundaries); row 1 is one document."""
    starts = torch.zeros(L, dtype=torch.long)
    starts[[L // n, min(L // n + 3, L - 1), L - 2]] = 1
    return torch.stack([starts.cumsum(0), torch.zeros(L, dtype=torch.long)])


def cases() -> dict[str, tuple[ModelConfig, ArchSpec | None, bool]]:
    """name -> (config, the nested budget's ArchSpec or None, soft masks); "packed-*" run with segment ids."""
    hybrid = ModelConfig.from_pattern("M-*M-M*", **SMALL)
    moe = ModelConfig.from_pattern("ME*M-E", **SMALL, experts=6, expert_ffn=16, shared_ffn=12, moe_top_k=2)
    llama = ModelConfig.from_pattern(
        "*-*-", **SMALL | dict(kv_heads=2), mlp_act="swiglu", rope_theta=10000.0, tie_embeddings=True
    )
    nested = ArchSpec.full(hybrid).replace(hidden=24, mlp=32, mamba_heads=2, attn_heads=2, drop_layers=[4])
    nested.layers[3] = ModelConfig.from_pattern("M", **SMALL).layers[0]  # heterogeneous: layer 3 keeps 4 heads
    return {
        "hybrid": (hybrid, None, False),
        "hybrid-moe": (moe, None, False),
        "llama": (llama, None, False),
        "nested-budget": (hybrid, nested, False),
        "soft-masks": (hybrid, None, True),
        "packed-hybrid": (hybrid, None, False),
        "packed-llama": (llama, None, False),
    }


def run(model: HybridLM, ids: torch.Tensor, weights: torch.Tensor, arch: ArchSpec | None, tap: Probe, **kw):
    logits = model(ids, arch=arch, tap=tap, **kw).logits
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads |= {f"mask.{n}": m.grad.clone() for n, m in tap.masks.items()}
    return logits.detach(), tap.first.grad.clone(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max(max |b|, 1): absolute for tensors within [-1, 1], relative beyond. (fp32 rounding
    alone, one process scanning with chunks of 4 instead of 8, moves a 0.04-sized gradient by 4e-7.)"""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def gather_against_torch(cg) -> float:
    """ContextGroup.gather's hand-written backward against torch.distributed.nn's all_gather (autograd)."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    if cg.size != dist.get_world_size():  # its gloo backward takes group ranks for global ones in a subgroup
        return 0.0
    g = torch.Generator().manual_seed(cg.info.rank)
    t, w = torch.randn(3, 5, generator=g), torch.randn(cg.size, 3, 5, generator=g)
    grads = []
    for gather in (cg.gather, lambda x: torch.stack(all_gather(x, group=cg.group))):
        x = t.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.distributed.nn is deprecated in favour of functional collectives
            (gather(x) * w).sum().backward()
        grads.append(x.grad)
    return rel(grads[0], grads[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="22,10")
    ap.add_argument("--context", type=int, default=0, help="context group size (default: every process)")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), 0, dist.get_backend())
    mesh = make_mesh(args.context or info.world, info)
    cg = mesh.context
    out: dict[str, float] = {"gather_backward": gather_against_torch(cg)}
    for name, (cfg, arch, masks) in cases().items():
        torch.manual_seed(0)
        ref = HybridLM(cfg)
        ref.reset_parameters(seed=1)
        part = copy.deepcopy(ref)
        for L in (int(s) for s in args.lengths.split(",")):
            g = torch.Generator().manual_seed(L + 1000 * mesh.data.rank)  # each data shard its own rows
            ids = torch.randint(0, cfg.vocab_size, (2, L), generator=g)
            weights = torch.randn(2, L, cfg.vocab_size, generator=g)
            for m in (ref, part):
                m.zero_grad(set_to_none=True)
            seg = {"segment_ids": segments(L, cg.size)} if name.startswith("packed") else {}
            logits, first, grads = run(ref, ids, weights, arch, Probe(cfg, masks), **seg)
            seg = {k: cg.part(v) for k, v in seg.items()}
            p_logits, p_first, p_grads = run(
                part, cg.part(ids), cg.part(weights), arch, Probe(cfg, masks), context=cg, **seg
            )
            for t in p_grads.values():  # a weight's gradient is the sum of its uses on every rank of the group
                dist.all_reduce(t, group=cg.group)
            diffs = {
                "logits": rel(p_logits, cg.part(logits)),
                "input_grad": rel(p_first, cg.part(first)),
                "param_grads": max(rel(p_grads[n], grads[n]) for n in grads),
            }
            assert set(p_grads) == set(grads), set(p_grads) ^ set(grads)
            for k, v in diffs.items():
                key = f"{name}/L={L}/{k}"
                t = torch.tensor(v)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                out[key] = float(t)
    ok = all(v <= args.tol for v in out.values())
    if info.rank == 0:
        print(json.dumps({"world": info.world, "context": cg.size, "ok": ok, "max": max(out.values()), "diffs": out}))
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
