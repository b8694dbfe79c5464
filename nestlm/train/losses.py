"""Losses: forward KL distillation from the teacher, cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) per token, averaged; scaled by T^2 so gradients keep their size."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, L)
    return kl.mean() * t * t


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
