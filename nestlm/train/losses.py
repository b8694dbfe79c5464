"""Losses: forward KL distillation from the teacher, cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that is not trained on (padding, prompt tokens): cross_entropy's ignore_index


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) per token, averaged; scaled by T^2 so gradients keep their size.

    With ``targets``, positions whose target is IGNORE are left out of the average."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, L)
    if targets is not None and bool((targets == IGNORE).any()):
        keep = (targets != IGNORE).to(kl.dtype)
        return (kl * keep).sum() / keep.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
