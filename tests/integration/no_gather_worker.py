"""``nestlm`` under torchrun with every full-state gather made to raise while a training checkpoint is saved.

Used by the sharded-checkpoint tests: a save that gathered the model or optimizer (as the
single-file format did) fails the run; the final elastic checkpoint may still gather.
"""

from __future__ import annotations

import sys

from torch.distributed.tensor import DTensor

import nestlm.train.checkpointer as checkpointer
import nestlm.train.distributed as distributed
import nestlm.train.trainer as trainer
from nestlm.cli import main

SAVING = False


def _guard(fn):
    def wrapped(*a, **k):
        if SAVING:
            raise RuntimeError("a training checkpoint gathered the full state")
        return fn(*a, **k)

    return wrapped


DTensor.full_tensor = _guard(DTensor.full_tensor)
distributed.full_state_dict = _guard(distributed.full_state_dict)
trainer.full_state_dict = _guard(trainer.full_state_dict)
_save = checkpointer.Checkpointer.save


def _saving(self, *a, **k):
    global SAVING
    SAVING = True
    try:
        return _save(self, *a, **k)
    finally:
        SAVING = False


checkpointer.Checkpointer.save = _saving

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
