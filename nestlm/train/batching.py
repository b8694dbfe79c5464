"""Global batch, micro-batch and gradient accumulation (torchtitan / Megatron names).

A stage gives its *global batch* (sequences per optimizer step, all ranks together) and a
*micro-batch* (sequences per rank per forward/backward). The accumulation steps follow:

    accum = global_batch / (micro_batch * world)

and a combination that does not divide exactly is refused. Old recipes say ``batch_size``
(the global batch of ONE forward/backward, split over the ranks) and ``train.grad_accum``
(how many of those make a step); they map to ``global_batch = batch_size * grad_accum`` and
``micro_batch = batch_size / world``, the same sequences per step as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NestlmError

DEFAULT_GLOBAL_BATCH = 8  # a stage that names no batch at all (StageSection's old batch_size default)


@dataclass(frozen=True)
class Batching:
    """The batch shape of one stage at one world size."""

    global_batch: int  # sequences per optimizer step, all ranks
    micro_batch: int  # sequences per rank per forward/backward
    accum: int  # micro-batches per rank per optimizer step
    world: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum

    def tokens(self, seq_len: int) -> int:
        """Tokens per optimizer step (all ranks), exact."""
        return self.global_batch * seq_len


def global_batch(stage: Any, train: Any) -> int:
    """Sequences per optimizer step; independent of the world size (stage lengths in tokens use it)."""
    if stage.global_batch is not None:
        return stage.global_batch
    if stage.batch_size is not None:
        return stage.batch_size * train.grad_accum
    return DEFAULT_GLOBAL_BATCH * train.grad_accum


def stage_batching(stage: Any, train: Any, world: int = 1) -> Batching:
    """Global batch, micro-batch and accumulation steps of ``stage`` on ``world`` ranks (or one clear error)."""
    name = f"stage {stage.name!r}"
    if stage.global_batch is None:  # the old names: batch_size is one micro-step's global batch
        step_batch = stage.batch_size if stage.batch_size is not None else DEFAULT_GLOBAL_BATCH
        if stage.micro_batch is not None:
            raise NestlmError(f"{name}: micro_batch needs global_batch (batch_size is the old name of a micro-step)")
        if step_batch % world:
            raise NestlmError(f"{name}: batch_size {step_batch} must be divisible by the {world} processes")
        return Batching(step_batch * train.grad_accum, step_batch // world, train.grad_accum, world)
    gb = stage.global_batch
    micro = stage.micro_batch if stage.micro_batch is not None else gb // world
    if micro < 1 or gb % (micro * world):
        raise NestlmError(
            f"{name}: global_batch {gb} is not a whole number of micro-batches: micro_batch {micro} x world size "
            f"{world} = {micro * world} sequences per micro-step does not divide it"
        )
    return Batching(gb, micro, gb // (micro * world), world)
