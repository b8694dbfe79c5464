"""train.kd_chunk_tokens: the trainer's chunked KD / CE gives the losses and weights of the full-logit path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import Trainer, train

FAST = ["data.max_bytes=40000", "stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=0"]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r.get("kd", r["loss"]) for r in rows if "loss" in r] + [
        v for r in rows if "val" in r for v in r["val"].values()
    ]


VOCAB = 259  # the tiny recipe's byte tokenizer


class VocabRows(TorchDispatchMode):
    """The most token rows of any tensor over the vocabulary (last dim = vocab) that an op allocates
    (views and in-place results share their input's storage and do not count), forward and backward:
    full logits of a micro-batch are (its tokens, vocab); a chunk's, (at most chunk, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == VOCAB:
                if t.untyped_storage().data_ptr() not in given:
                    self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def spied_train(overrides: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """train() under a VocabRows spy from the first step to the saved model (the set-up's importance
    ranking, which needs full logits, left out); the most vocab rows the run allocated at once."""
    spy, real = VocabRows(), Trainer.run

    def run(self: Trainer) -> Path:
        with spy:
            return real(self)

    monkeypatch.setattr(Trainer, "run", run)
    train(load_recipe("tiny", overrides), out, progress=False)
    monkeypatch.undo()
    return spy.rows


@pytest.mark.parametrize(
    "overrides",
    [["elastic.mask=hard"], ["elastic.mask=soft"], ["elastic.trainable_teacher=true"], ["train.mode=plain"]],
    ids=["hard", "soft", "trainable-teacher", "plain"],
)
def test_chunked_losses_equal_full_logits(
    tmp_path: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    rows_full = spied_train(FAST + overrides, full, monkeypatch)
    rows_chunked = spied_train([*FAST, *overrides, "train.kd_chunk_tokens=37"], chunked, monkeypatch)
    # the full logits are never materialised: no tensor over the vocabulary of more than one chunk's 37 tokens,
    # where the full-logit run holds a whole micro-batch's (8 x 64 = 4 x 128 = 512 tokens)
    print(f"most token rows over the vocabulary at once: {rows_full} full, {rows_chunked} chunked")
    assert rows_full == 512 and 0 < rows_chunked <= 37, (rows_full, rows_chunked)
    a, b = _losses(full), _losses(chunked)
    assert len(a) == len(b) >= 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5
    wa, wb = load_file(full / "model.safetensors"), load_file(chunked / "model.safetensors")
    # AdamW divides by sqrt(v): where a gradient is ~0, float noise of 1e-7 moves a weight by up to lr-sized
    # steps' fractions, so the weights agree to 1e-4 (lr 1e-3, 5 steps) while every loss agrees to 1e-5
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
