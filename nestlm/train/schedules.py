"""Schedules of a run: the learning rate per stage, and the routers' Gumbel temperature and logit scale."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..elastic.router import gumbel_schedule

__all__ = ["gumbel_schedule", "lr_factor", "set_lr"]


def lr_factor(stage: Any, step: int, steps: int) -> float:
    """Linear warmup over ``stage.warmup_steps``, then cosine decay to ``stage.min_lr_ratio``."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    t = (step - stage.warmup_steps) / max(1, steps - stage.warmup_steps)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(opt: torch.optim.Optimizer, stage: Any, base_lr: float, step: int, steps: int) -> None:
    """Each parameter group's LR at ``step`` of the stage (a stage's own ``lr`` rescales every group)."""
    f = lr_factor(stage, step, steps)
    for g in opt.param_groups:
        base = g["base_lr"] if stage.lr is None else g["base_lr"] * stage.lr / base_lr
        g["lr"] = base * f
