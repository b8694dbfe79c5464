"""One optimizer step's forward and backward passes: micro-batches, token weights, routers, clipping.

A batch is (inputs, targets), or (inputs, targets, segments) for packed rows: the segments go to
the model as ``segment_ids`` (train/loader.py).

A rank's share of the global batch is split into ``accum`` micro-batches; each runs forward and
backward at once (no graph outlives its micro-batch). Each micro-batch's mean loss is weighted
by its share of the *global* batch's trained tokens (targets that are not IGNORE, counted over
all ranks), so a step's gradient is the token mean over the global batch whatever the world
size and accumulation: micro-batch 2 x 2 steps equals 4 x 1.

The routers are sampled once per step. Every micro-batch reads the sample through detached
leaf copies of its probabilities, whose gradients add up over the micro-batches; one backward
through the router graph at the end carries them together with the budget loss. This is
the same gradient as keeping the router graph alive (``retain_graph``) across micro-batches,
without keeping anything alive.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..elastic import training as el
from ..elastic.router import RouterSample
from .distributed import DistInfo, all_reduce_sum
from .losses import IGNORE, ce_loss

Batch = list[tuple[torch.Tensor, ...]]


def micro_batches(batch: tuple[torch.Tensor, ...], micro: int) -> Batch:
    """A rank's (inputs, targets[, segments]) of one step, (per_rank, L) each, in micro-batches of ``micro`` rows."""
    return list(zip(*(t.split(micro) for t in batch), strict=True))


def on_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(inputs, targets, the model's keyword arguments: the segment ids of packed rows) on ``device``."""
    x, y, *seg = (t.to(device) for t in batch)
    return x, y, {"segment_ids": seg[0]} if seg else {}


def token_weights(batches: Batch, device: torch.device, info: DistInfo) -> list[float]:
    """Weight of each micro-batch's mean loss: world * its trained tokens / the global batch's.

    FSDP2 averages gradients over the ranks (and average_gradients the routers'), hence the
    factor world: the averaged gradient is then the global token mean."""
    counts = torch.tensor([float((b[1] != IGNORE).sum()) for b in batches], device=device)
    total = float(all_reduce_sum(counts.sum(), info))
    if total == 0:
        return [0.0] * len(batches)
    return [float(c) * info.world / total for c in counts.tolist()]


def _leaf(sample: RouterSample) -> RouterSample:
    return RouterSample({a: p.detach().requires_grad_() for a, p in sample.probs.items()}, sample.choice)


def forward_backward(
    t: Any, budget: str, sample: RouterSample | None, arch: Any, batches: Batch
) -> tuple[float, float, float | None]:
    """Forward and backward of every micro-batch of a step, and the routers' backward.

    ``t``: the Trainer. Returns (the loss averaged over the global batch's tokens, the budget
    loss, the expected cost or None)."""
    e = t.recipe.elastic
    weights = token_weights(batches, t.device, t.dist)
    leaf = _leaf(sample) if sample is not None else None
    loss_sum = torch.zeros((), device=t.device)
    for batch, w in zip(batches, weights, strict=True):
        x, y, kw = on_device(batch, t.device)
        forward = functools.partial(t._forward, **kw) if kw else t._forward
        if not t.elastic:
            loss = ce_loss(forward(t.model, x), y)
        else:
            with torch.no_grad():
                t_logits = forward(t.teacher if t.teacher is not None else t.model, x)
            loss = el.student_loss(forward, t.model, t.routers, leaf, arch, x, y, t_logits, e)
        loss_sum = loss_sum + loss.detach() * w
        (loss * w).backward()
    bl_val, cost_val = 0.0, None
    if sample is not None:
        bl, cost = t.routers.budget_loss(sample, t.targets[budget], e.tolerance, **el.memory_kw(e))
        tensors: list[torch.Tensor] = [e.budget_loss_weight * bl]
        grads: list[torch.Tensor | None] = [None]
        for a, p in leaf.probs.items():
            if p.grad is not None:
                tensors.append(sample.probs[a])
                grads.append(p.grad)
        torch.autograd.backward(tensors, grads)
        bl_val, cost_val = float(bl.detach()), float(cost.detach())
    return float(all_reduce_sum(loss_sum, t.dist)) / t.dist.world, bl_val, cost_val


def _group_norm(params: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    n = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(n, "full_tensor"):  # a DTensor under FSDP2 (every rank calls this: it is a collective)
        n = n.full_tensor()
    return n.float().to(device)


def clip_gradients(
    opt: torch.optim.Optimizer, max_norm: float, router_max_norm: float | None, device: torch.device
) -> dict[str, float]:
    """Clip the model (group 0) and the routers (group 1) each by its own norm; both norms, before clipping.

    One global norm would let a router spike (its LR is ~100x) shrink the model's update."""
    out = {}
    for i, g in enumerate(opt.param_groups):
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            continue
        limit = max_norm if i == 0 or router_max_norm is None else router_max_norm
        norm = _group_norm(params, device)
        if limit:
            torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
        out["grad_norm" if i == 0 else "router_grad_norm"] = float(norm)
    return out
