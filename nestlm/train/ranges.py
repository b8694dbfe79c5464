"""The valid range of every numeric recipe key, checked before any work starts.

A value out of range is one line naming the key, the value and the range (``train.lr = -1.0 must
be > 0``), raised by ``recipe.validate`` when the recipe is loaded: never a torch traceback from
deep inside the optimizer, never a stage silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rule = tuple[str, Callable[[Any], bool]]

POSITIVE: Rule = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Rule = (">= 0", lambda v: v >= 0)
AT_LEAST_ONE: Rule = (">= 1", lambda v: v >= 1)
FRACTION: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)
OPEN_FRACTION: Rule = ("in [0, 1)", lambda v: 0 <= v < 1)

# section -> key -> rule; None values are "unset" and skipped (their defaults apply)
RANGES: dict[str, dict[str, Rule]] = {
    "train": {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "grad_clip": NON_NEGATIVE,
        "router_grad_clip": NON_NEGATIVE,
        "grad_accum": AT_LEAST_ONE,
        "seed": NON_NEGATIVE,
        "checkpoint_every": NON_NEGATIVE,  # 0: at stage ends only
        "keep_last": NON_NEGATIVE,  # 0: keep every checkpoint
        "eval_every": NON_NEGATIVE,
        "eval_batches": AT_LEAST_ONE,
        "threads": AT_LEAST_ONE,
        "context_parallel": AT_LEAST_ONE,
    },
    "data": {
        "val_fraction": OPEN_FRACTION,
        "seed": NON_NEGATIVE,
        "max_bytes": AT_LEAST_ONE,
        "num_problems": AT_LEAST_ONE,
    },
    "elastic": {
        "d_router": AT_LEAST_ONE,
        "router_lr_mult": POSITIVE,
        "router_eps": POSITIVE,
        "budget_loss_weight": NON_NEGATIVE,
        "tolerance": FRACTION,
        "width_multiple": AT_LEAST_ONE,
        "kd_temperature": POSITIVE,
        "importance_batches": AT_LEAST_ONE,
    },
    "stage": {
        "seq_len": (">= 2", lambda v: v >= 2),
        "steps": NON_NEGATIVE,  # 0: the stage is skipped, as asked
        "tokens": AT_LEAST_ONE,
        "lr": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
        "min_lr_ratio": FRACTION,
        "global_batch": AT_LEAST_ONE,
        "micro_batch": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
    },
}


def _check(where: str, value: Any, rule: Rule, error: type[Exception]) -> None:
    text, ok = rule
    if value is not None and not ok(value):
        raise error(f"{where} = {value!r} must be {text}")


def check_ranges(recipe: Any, error: type[Exception]) -> None:
    """Raise ``error`` naming the first recipe key outside its range."""
    for section in ("train", "data", "elastic"):
        for key, rule in RANGES[section].items():
            _check(f"{section}.{key}", getattr(getattr(recipe, section), key), rule, error)
    betas = recipe.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise error(f"train.betas = {betas!r} must be two numbers in [0, 1)")
    for i, stage in enumerate(recipe.stages):
        for key, rule in RANGES["stage"].items():
            _check(f"stages.{i}.{key} (stage {stage.name!r})", getattr(stage, key), rule, error)
