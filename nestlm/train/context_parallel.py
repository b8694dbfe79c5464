"""Context parallelism: every sequence cut into N contiguous parts over a context group of N ranks.

``train.context_parallel: N`` arranges the W ranks as a (data, context) mesh: rank ``d * N + c``
holds part ``c`` of the sequences of data shard ``d`` (a context group is N consecutive ranks: one
node's GPUs under NCCL). FSDP2 still shards the weights over all W ranks; the loaders give each of
the W / N data shards its rows of the global batch as before, and each rank keeps its columns
``[c L/N, (c+1) L/N)`` of them (:class:`PartLoader`).

What crosses the parts, and how. A :class:`ContextGroup` is the ``context`` that
``HybridLM.forward`` hands to its mixers (the ``SequencePart`` of nestlm/cache.py):
  * positions: part c starts at c L/N (RoPE, attention's causal offset);
  * attention: keys and values all-gathered over the group (GQA: only the KV heads travel); part c
    attends to the parts up to its own under a lower-right causal mask;
  * the Mamba2 conv: the previous part's last ``conv_kernel - 1`` inputs;
  * the Mamba2 scan: a part's final state is affine in its initial state, h_out = a h_in + S with
    a = exp(sum_t dt_t A) and S its final state from a zero start. Every part scans from zero, the
    summaries (log a, S) are all-gathered, and each rank combines those before it in order into its
    true initial state h_c = sum_{j<c} (prod_{j<k<c} a_k) S_j and adds what h_c contributes to its
    outputs, C_t . h_c exp(sum_{s<=t} dt_s A): the one-sequence scan, exactly (up to rounding);
  * MLP and MoE blocks are token-local: nothing crosses;
  * packed documents (``segment_ids``): the model numbers them from the sequence's start (``prefix``);
    attention keeps to a query's document, the conv history and the entering state reach only the
    positions of the previous part's last document, and a part in which a document starts passes on
    no decayed state of its own beginning (its summary's ``keep`` is 0).
Backward is autograd through the collectives: :class:`_Gather` is an all-gather whose backward is
its adjoint (the gradients summed over the group, this rank's share). That backward is a collective
too, so every rank must reach every gather in its backward: a rank that uses none of a gather's
parts (part 0 has nothing before it) keeps the gather in its graph multiplied by zero.

Losses stay token means over the global batch (train/step.py): each rank weights its part's mean
loss by the part's share of the global batch's trained tokens, and FSDP2 averages over all W ranks.
Routers, budget sampling and Gumbel draws come from generators seeded alike on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import NestlmError
from .distributed import DistInfo, backend_for, check_device


class _Gather(torch.autograd.Function):
    """All-gather over a group, stacked (n, *shape) in rank order; backward: the gradients summed over
    the group (each rank's gradient for every part), this rank's part."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cg: ContextGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.cg = cg
        return cg.gather_plain(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        cg: ContextGroup = ctx.cg
        g = g.contiguous()
        if backend_for(cg.info.backend, g.device) == "nccl":  # reduce-scatter: only this rank's part travels back
            out = torch.empty_like(g[0])
            dist.reduce_scatter(out, list(g.unbind(0)), group=cg.group)
            return out, None
        g = g.clone()  # gloo has no reduce-scatter: sum every part, keep this rank's
        dist.all_reduce(g, group=cg.group)
        return g[cg.rank], None


class ContextGroup:
    """This rank's place in its context group, and the exchanges a part of a sequence needs.

    ``rank`` (c) of ``size`` (N) within ``group``; implements nestlm.cache.SequencePart."""

    def __init__(self, group: Any, rank: int, size: int, info: DistInfo) -> None:
        self.group, self.rank, self.size, self.info = group, rank, size, info

    # ------------------------------------------------------------ collectives
    def gather_plain(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked (N, *shape) in rank order; no gradient."""
        check_device(t, self.info, "context parallelism")
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked (N, *shape) in rank order, differentiable (gradients reach each rank)."""
        return _Gather.apply(t, self)

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's columns of (B, L) inputs or targets: ``[c L/N, (c+1) L/N)``."""
        L = t.shape[1]
        if L % self.size:
            raise NestlmError(f"train.context_parallel {self.size} does not divide the sequence length {L}")
        n = L // self.size
        return t[:, self.rank * n : (self.rank + 1) * n]

    # ------------------------------------------------------------ SequencePart
    def offset(self, length: int) -> int:
        return self.rank * length

    def prefix(self, t: torch.Tensor) -> torch.Tensor:
        got = self.gather_plain(t)  # (N, B, L)
        return got[: self.rank + 1].permute(1, 0, 2).reshape(t.shape[0], -1)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nkv, L, hd = k.shape
        kv = self.gather(torch.stack([k, v]))  # (N, 2, B, nkv, L, hd): one exchange for both
        # parts 0..c along the sequence; the later parts stay in the graph through the slice (zero gradient)
        kv = kv[: self.rank + 1].permute(1, 2, 3, 0, 4, 5).reshape(2, B, nkv, (self.rank + 1) * L, hd)
        return kv[0], kv[1]

    def conv_history(self, x: torch.Tensor, width: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        L = x.shape[-1]
        if L < width:
            raise NestlmError(
                f"context parallelism: a part of {L} tokens is shorter than the Mamba conv's window of {width}; "
                "lower train.context_parallel or raise seq_len"
            )
        tails = self.gather(x[..., L - width :])  # (N, B, C, width): every part's last inputs
        ids = None if seq_idx is None else self.gather_plain(seq_idx[:, L - width :])  # (N, B, width), every rank
        if not self.rank:
            return tails[0] * 0  # zeros before the sequence (the gather stays in the graph: its backward)
        hist = tails[self.rank - 1]
        if ids is not None:  # only the inputs of this part's first document reach into it
            hist = hist * (ids[self.rank - 1] == seq_idx[:, :1])[:, None, :].to(hist.dtype)
        return hist

    def add_initial_state(
        self,
        y: torch.Tensor,
        final: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        C: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        reach = None
        if seq_idx is not None:  # the entering state is the previous part's last document's
            last = self.gather_plain(seq_idx[:, -1:])  # (N, B, 1)
            reach = seq_idx == (last[self.rank - 1] if self.rank else -1)  # (B, L)
        with torch.autocast(y.device.type, enabled=False):  # the state algebra in fp32, as the scan's own
            cs = torch.cumsum(dt.float() * A.float(), dim=1)  # (B, L, H): the log decay from the part's start
            got = self.gather(state_summary(final, cs, reach))  # (N, B, H, P*N + 2)
            h0 = initial_state(got[..., :-2], got[..., -2], got[..., -1], self.rank).view(final.shape)
            return add_state(y, h0, cs, C, reach)


def state_summary(final: torch.Tensor, cs: torch.Tensor, reach: torch.Tensor | None = None) -> torch.Tensor:
    """A part's summary (B, H, P*N + 2), exchanged at once: its final state from a zero start (B, H, P, N),
    the log of its whole decay sum_t dt_t A (the last of ``cs`` (B, L, H), cumulative log decays), and
    1 if the state entering the part lasts to its end (0 when a document starts in it: ``reach`` (B, L),
    the positions the entering state reaches, is False at its end)."""
    B, H = final.shape[:2]
    keep = cs.new_ones(B, H, 1) if reach is None else reach[:, -1, None, None].to(cs.dtype).expand(B, H, 1)
    return torch.cat([final.float().reshape(B, H, -1), cs[:, -1, :, None], keep], dim=-1)


def initial_state(S: torch.Tensor, la: torch.Tensor, keep: torch.Tensor, c: int) -> torch.Tensor:
    """The true state entering part ``c`` (B, H, P*N) from every part's summary: final state from zero
    S (n, B, H, P*N), log decay la and keep (n, B, H). It is h_c = sum_{j<c} (prod_{j<k<c} keep_k a_k) S_j,
    the recurrence h_{j+1} = keep_j a_j h_j + S_j unrolled. Weights in log space (the log decays strictly
    between j and c summed); every part enters the sum (weight 0 from c on), so that every rank's backward
    reaches the gather."""
    j = torch.arange(S.shape[0], device=S.device)
    between = (j[:, None] < j[None, :]) & (j[None, :] < c)  # (j, k): j < k < c
    w = torch.exp(torch.einsum("jk,kbh->jbh", between.to(la.dtype), la))
    kept = ((keep[None] > 0) | ~between[:, :, None, None]).all(1)  # (j, B, H): no document starts between
    w = w * kept.to(w.dtype) * (j < c).to(w.dtype)[:, None, None]
    return torch.einsum("jbh,jbhm->bhm", w, S)


def add_state(
    y: torch.Tensor, h0: torch.Tensor, cs: torch.Tensor, C: torch.Tensor, reach: torch.Tensor | None = None
) -> torch.Tensor:
    """y (B, L, H, P) of a scan from zero, plus what the initial state h0 (B, H, P, N) adds at each t:
    C_t . h0 decayed by exp(cs_t) (B, L, H), per head (head r*G + g reads group g's C (B, L, G, N)), at
    the positions ``reach`` (B, L) marks (None: all). ssd_scan_ref's step 4, once over the whole part."""
    B, L, H, P = y.shape
    G, N = C.shape[2], C.shape[3]
    h0 = h0.float().view(B, H // G, G, P, N)  # (B, r, g, p, n)
    decay = torch.exp(cs) if reach is None else torch.exp(cs) * reach[..., None].to(cs.dtype)  # (B, L, H)
    y_in = torch.einsum("blgn,brgpn->blrgp", C.float(), h0).reshape(B, L, H, P) * decay[..., None]
    return (y.float() + y_in).to(y.dtype)


@dataclass
class Mesh:
    """The (data, context) arrangement of the ranks: ``context`` None without context parallelism;
    ``data`` this rank's data shard and their number (what the loaders and batch shapes use)."""

    context: ContextGroup | None
    data: DistInfo

    def loader(self, loader: Any) -> Any:
        """A stage's loader, cut to this rank's part of every sequence."""
        return loader if self.context is None else PartLoader(loader, self.context)


def make_mesh(n: int, info: DistInfo) -> Mesh:
    """The mesh of ``train.context_parallel: n`` over the job's ranks (n = 1: data parallel only)."""
    if n == 1:
        return Mesh(None, info)
    if n < 1 or info.world % n:
        raise NestlmError(
            f"train.context_parallel {n} must divide the number of processes ({info.world}); "
            f"run under torchrun with a multiple of {n}"
        )
    # every rank creates every group, in the same order (a collective of the default group)
    groups = [dist.new_group(list(range(d * n, (d + 1) * n))) for d in range(info.world // n)]
    d, c = divmod(info.rank, n)
    data = DistInfo(d, info.world // n, info.local_rank, info.backend)
    return Mesh(ContextGroup(groups[d], c, n, info), data)


class PartLoader:
    """A loader whose batches are this rank's part of every sequence; its position is the loader's own
    (checkpoints hold the same data position at any context size)."""

    def __init__(self, loader: Any, context: ContextGroup) -> None:
        self.inner, self.context = loader, context

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets[, segments]) of this rank's data shard, each cut to this rank's part."""
        return tuple(self.context.part(t) for t in self.inner.next_batch())

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(self.context.part(t) for t in b) for b in self.inner.val_batches(n)]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
