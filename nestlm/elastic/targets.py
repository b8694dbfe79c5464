"""Budget targets: what a budget asks for (a fraction, a total, an active count, both, or bytes).

A target is parsed from the recipe's text (``0.5``, ``6e9``, ``active=2e9``, ``23e9,active=2.8e9``,
``12GB``) and gives its goals as (measure, value) pairs: ``params`` (total), ``active`` (per token:
a MoE layer counts its top-k routed experts) or ``memory`` bytes. The one-shot search, the routers'
budget loss and the freezing of budgets all measure a sub-network against every goal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import NestlmError
from .counts import active_parameters, count_parameters, memory_bytes


class ArchError(NestlmError):
    """An ArchSpec that the parent cannot nest, or a budget it cannot reach."""


MEASURES = ("params", "active", "memory")


def measure(config: ModelConfig, what: str, dtype: torch.dtype = torch.bfloat16, batch: int = 1, context: int = 4096):
    """One cost of a config: ``params`` (total), ``active`` (per token: MoE top-k experts) or ``memory`` bytes."""
    if what == "memory":
        return memory_bytes(config, dtype, batch, context)
    return count_parameters(config, active=what == "active")


@dataclass(frozen=True)
class Target:
    """A budget target: a fraction of the parent's parameters, a parameter count, an active-parameter
    count (MoE: the parameters a token runs through), a total and an active count together, or a
    memory size. An active value <= 1 is a fraction of the parent's active parameters."""

    kind: str  # "fraction" | "params" | "active" | "memory"
    value: float
    active: float | None = None  # with "fraction" / "params": an active-parameter goal as well

    def params(self, config: ModelConfig) -> float:
        """Target total parameter count (fraction and params targets)."""
        if self.kind == "fraction":
            return self.value * count_parameters(config)
        if self.kind == "params":
            return self.value
        raise ValueError(f"a {self.kind} target has no total parameter count; use goals()")

    def goals(self, config: ModelConfig) -> list[tuple[str, float]]:
        """The (measure, goal) pairs this target asks for, measure one of MEASURES."""

        def active(v: float) -> float:
            return v * active_parameters(config) if v <= 1 else v

        if self.kind == "memory":
            return [("memory", self.value)]
        if self.kind == "active":
            return [("active", active(self.value))]
        out = [("params", self.params(config))]
        return out + ([("active", active(self.active))] if self.active is not None else [])

    def __str__(self) -> str:
        def active(v: float) -> str:
            return f"{v:g} of the parent's active parameters" if v <= 1 else f"{v:.4g} active parameters"

        if self.kind == "memory":
            return f"{self.value / 2**30:.3g} GiB"
        if self.kind == "active":
            return active(self.value)
        whole = f"{self.value:.4g} parameters"
        txt = f"{self.value:g} of the parent's parameters" if self.kind == "fraction" else whole
        return txt if self.active is None else f"{txt}, {active(self.active)}"


_MEM = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*(k|m|g|t)(i?)b\s*$", re.IGNORECASE)
_FORMS = (
    "a fraction (0.5), a parameter count (6e9 or 6b), active=COUNT (2e9), both (23e9,active=2.8e9) or a memory "
    "size (12GB)"
)
_COUNT = re.compile(r"^\s*([0-9.]+)\s*([kmbt])\s*$", re.IGNORECASE)  # 6b = 6e9 parameters, 500m = 5e8


def _number(text: str, value: Any) -> float:
    m = _COUNT.match(value) if isinstance(value, str) else None
    if m:  # a count with a suffix, as budgets are named: 6b, 500m
        value = float(m.group(1)) * 1000 ** ("kmbt".index(m.group(2).lower()) + 1)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArchError(f"budget target {text!r} is not {_FORMS}") from None
    if not math.isfinite(v) or v <= 0:
        raise ArchError(f"budget target {v:g} must be a positive, finite number")
    if v > 1 and not v.is_integer():
        raise ArchError(f"budget target {v:g} is neither a fraction of the parent (<= 1) nor a whole parameter count")
    return v


def parse_target(value: str | float | int) -> Target:
    """``0.5`` -> fraction, ``6e9`` or ``6b`` -> params, ``active=2e9`` -> active params (MoE),
    ``23e9,active=2.8e9`` -> both, ``12GB`` / ``12GiB`` -> memory bytes."""
    if isinstance(value, str):
        m = _MEM.match(value)
        if m:
            num, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
            if not num > 0:
                raise ArchError(f"budget target {value!r}: a memory size must be positive")
            scale = (1024 if binary else 1000) ** "kmgt".index(unit) * (1024 if binary else 1000)
            return Target("memory", num * scale)
        parts = [p.strip() for p in value.split(",")]
        if any(p.lower().startswith("active") for p in parts):
            total, active = None, None
            for p in parts:
                key, eq, num = p.partition("=")
                if eq and key.strip().lower() == "active" and active is None:
                    active = _number(value, num)
                elif not eq and total is None:
                    total = _number(value, p)
                else:
                    raise ArchError(f"budget target {value!r} is not {_FORMS}")
            if active is None:
                raise ArchError(f"budget target {value!r} is not {_FORMS}")
            if total is None:
                return Target("active", active)
            return Target("fraction" if total <= 1 else "params", total, active)
        if len(parts) > 1:
            raise ArchError(f"budget target {value!r} is not {_FORMS}")
    v = _number(str(value), value)
    return Target("fraction", v) if v <= 1 else Target("params", v)


def target_error(parent: ModelConfig, config: ModelConfig, target: Target, **memory_kw: Any) -> float:
    """The largest relative miss of ``config`` (a sub-network of ``parent``) over the target's goals."""
    return max(abs(measure(config, what, **memory_kw) / goal - 1) for what, goal in target.goals(parent))
