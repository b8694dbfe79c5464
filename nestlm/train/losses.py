"""Losses: forward KL distillation from the teacher, cross entropy.

Each loss takes either full logits (B, L, vocab) or a ``Head``: the final hidden states and the
output weight that would turn them into logits. With Heads the loss runs in chunks of
``Head.chunk`` tokens and never holds more than one chunk's logits: ``ChunkedHeadLoss`` applies
the head per chunk, takes the chunk's gradients (hidden and weight) at once and keeps only
those, so peak memory does not grow with the sequence beyond the (tokens, hidden) gradient.
Same design as Liger-Kernel's fused linear cross entropy / distillation, in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that is not trained on (padding, prompt tokens): cross_entropy's ignore_index


@dataclass
class Head:
    """A model's output before the lm_head: what the chunked losses take instead of logits."""

    hidden: torch.Tensor  # (B, L, H) final normed hidden states
    weight: torch.Tensor  # (V, >= H) output weight; its first H columns are used (a width-sliced student)
    chunk: int  # tokens per chunk
    dtype: torch.dtype | None = None  # compute dtype of the head matmul (the run's autocast dtype), else the weight's

    def logits(self) -> torch.Tensor:
        """The full logits (B, L, V) in fp32: the reference the chunked path equals."""
        h, w = self._operands()
        return F.linear(h, w).float()

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        H = self.hidden.shape[-1]
        w = self.weight if self.weight.shape[1] == H else self.weight[:, :H]  # a slice's backward costs a (V, H) copy
        dt = self.dtype or w.dtype
        return self.hidden.to(dt), w.to(dt)


def kd_loss(
    student: torch.Tensor | Head,
    teacher: torch.Tensor | Head,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) per token, averaged; scaled by T^2 so gradients keep their size.

    With ``targets``, positions whose target is IGNORE are left out of the average."""
    if isinstance(student, Head):
        return chunked_loss(student, teacher, targets, temperature, kd_weight=1.0, ce_weight=0.0)
    if isinstance(teacher, Head):
        teacher = teacher.logits()
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, L)
    if targets is not None and bool((targets == IGNORE).any()):
        keep = (targets != IGNORE).to(kl.dtype)
        return (kl * keep).sum() / keep.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t


def ce_loss(logits: torch.Tensor | Head, targets: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, Head):
        return chunked_loss(logits, None, targets, 1.0, kd_weight=0.0, ce_weight=1.0)
    if bool((targets == IGNORE).all()):  # nothing trained here (a padded part of a sequence): 0, not NaN
        return logits.float().sum() * 0.0  # the graph stays whole: its backward may hold collectives
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def chunked_loss(
    student: Head,
    teacher: torch.Tensor | Head | None,
    targets: torch.Tensor | None,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """kd_weight * kd_loss + ce_weight * ce_loss, ``student.chunk`` tokens at a time (see ChunkedHeadLoss)."""
    if ce_weight and targets is None:
        raise ValueError("the cross entropy needs targets")
    s_h, s_w = student._operands()
    t_h = t_w = None
    if kd_weight:
        if teacher is None:
            raise ValueError("distillation needs the teacher's logits or Head")
        if isinstance(teacher, Head):
            t_h, t_w = teacher._operands()
            t_h = t_h.detach().flatten(0, 1)
            t_w = t_w.detach()
        else:  # teacher logits given whole: the teacher side is then not chunked
            t_h = teacher.detach().flatten(0, 1)
    n = s_h.shape[0] * s_h.shape[1]
    y = targets.flatten() if targets is not None else torch.zeros(n, dtype=torch.long, device=s_h.device)
    spec = (float(temperature), float(kd_weight), float(ce_weight), max(1, int(student.chunk)))
    return ChunkedHeadLoss.apply(s_h.flatten(0, 1), s_w, t_h, t_w, y, spec)


def _chunk_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor | None,
    y: torch.Tensor,
    denoms: tuple[torch.Tensor, torch.Tensor],
    spec: tuple[float, float, float, int],
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's share of the batch loss (its sums over tokens divided by the whole batch's counts)
    and, with ``grad``, its gradient for the chunk's logits, written out so that few (C, V) buffers live:
    KD: T (softmax(s / T) - softmax(t / T)) per kept token; CE: softmax(s) - onehot(y)."""
    t, kd_w, ce_w, _ = spec
    keep = (y != IGNORE).to(s_logits.dtype)  # (C,)
    loss = s_logits.new_zeros(())
    g = None
    if kd_w:
        s_logp = F.log_softmax(s_logits if t == 1 else s_logits / t, dim=-1)
        t_logp = F.log_softmax(t_logits if t == 1 else t_logits / t, dim=-1)
        p_t = t_logp.exp()
        kl = t_logp.sub_(s_logp).mul_(p_t).sum(-1)  # (C,) sum p_t (log p_t - log p_s), in place
        del t_logp
        loss = loss + kd_w * (kl * keep).sum() / denoms[0] * t * t
        if grad:
            g = s_logp.exp_().sub_(p_t).mul_((keep * (kd_w * t / denoms[0]))[:, None])
        del s_logp, p_t
    if ce_w:
        logp = F.log_softmax(s_logits, dim=-1)
        safe = y.clamp_min(0)[:, None]
        loss = loss - ce_w * (logp.gather(1, safe)[:, 0] * keep).sum() / denoms[1]
        if grad:
            gc = logp.exp_()
            gc.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=gc.dtype))
            gc.mul_((keep * (ce_w / denoms[1]))[:, None])
            g = gc if g is None else g.add_(gc)
    return loss, g


class ChunkedHeadLoss(torch.autograd.Function):
    """The loss of ``_chunk_loss`` summed over token chunks, from hidden states and head weights.

    Forward: per chunk, the student's logits (C, V) from its hidden chunk and weight, the teacher's
    (no grad), the chunk's loss and its gradient for the logits (written out in _chunk_loss), from
    which the hidden chunk's gradient and the weight's (accumulated in place, fp32) follow; the
    chunk's logits are then freed. Backward only scales the stored gradients by the incoming one.
    Equal to the unchunked loss up to summation order."""

    @staticmethod
    def forward(ctx, s_h, s_w, t_h, t_w, y, spec):  # type: ignore[override]
        chunk = spec[3]
        keep = (y != IGNORE).sum().to(torch.float32)
        denoms = (keep.clamp_min(1.0), keep.clamp_min(1.0))  # masked means (0 when nothing is kept, not NaN)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False under no_grad: loss only
        g_h = torch.zeros_like(s_h) if need else None
        g_w = torch.zeros(s_w.shape, dtype=torch.float32, device=s_w.device) if need else None
        total = torch.zeros((), dtype=torch.float32, device=s_h.device)
        for i in range(0, s_h.shape[0], chunk):
            sl = slice(i, i + chunk)
            h = s_h[sl]  # (C, H)
            t_logits = None
            if t_h is not None:
                t_logits = t_h[sl].float() if t_w is None else F.linear(t_h[sl], t_w).float()
            logits = F.linear(h, s_w).float()  # (C, V)
            loss, g = _chunk_loss(logits, t_logits, y[sl], denoms, spec, need)
            total += loss
            del logits, t_logits
            if not need:
                continue
            g_h[sl] = g.to(s_w.dtype) @ s_w  # what F.linear's backward gives, chunk by chunk
            g_w.addmm_(g.t(), h.float())  # accumulated in place: no (V, H) temporary per chunk
        # held on ctx, not saved: backward hands them over, and autograd can take them without a copy
        ctx.grads, ctx.w_dtype = (g_h, g_w), s_w.dtype
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.grads is None:  # handed over by the first backward
            raise RuntimeError("ChunkedHeadLoss supports one backward per forward")
        (g_h, g_w), ctx.grads = ctx.grads, None  # scaled in place: no second (tokens, hidden) or (vocab, hidden)
        g_h = None if g_h is None else g_h.mul_(grad.to(g_h.dtype))
        g_w = None if g_w is None else g_w.mul_(grad).to(ctx.w_dtype)
        return g_h, g_w, None, None, None, None
