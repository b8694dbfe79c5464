"""Packed rows train exactly as the same documents alone, one per row (segment ids reach the model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from nestlm.train.losses import IGNORE
from nestlm.train.recipe import load_recipe
from nestlm.train.step import micro_batches
from nestlm.train.trainer import Trainer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def documents(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Texts of 3 to 60 bytes: many to a row of 64, most across the scan chunk of 8."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))[: rng.randint(3, 60)]
            f.write(json.dumps({"text": text}) + "\n")
    return path


def one_per_row(batch: tuple[torch.Tensor, ...], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents of packed rows, each alone in a row of its own, padded (padding is never a target)."""
    x, y, seg = batch
    xs, ys = [], []
    for r in range(x.shape[0]):
        for s in seg[r].unique():
            m = seg[r] == s
            if bool((x[r][m] == pad).all()) and bool((y[r][m] == IGNORE).all()):
                continue  # the row's padding
            xs.append(torch.full_like(x[r], pad))
            ys.append(torch.full_like(y[r], IGNORE))
            xs[-1][: int(m.sum())], ys[-1][: int(m.sum())] = x[r][m], y[r][m]
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("mode", ["plain", "elastic"])
def test_packed_rows_train_like_the_documents_alone(mode: str, tmp_path: Path, one_thread: None) -> None:
    src = documents(tmp_path / "docs.jsonl")
    ov = [f"data.train={src}", "data.packing=rows", "data.val_fraction=0", "train.dtype=float32",
          f"train.mode={mode}", "model.init.mamba_chunk_size=8", "elastic.importance_batches=1",
          "train.tensorboard=false"]  # fmt: skip
    r = load_recipe("tiny", ov)
    packed, alone = Trainer(r, tmp_path / "packed", progress=False), Trainer(r, tmp_path / "alone", progress=False)
    loader = packed.data.loader(0)
    for _ in range(4):
        batch = loader.next_batch()
        x, y, seg = batch
        assert int(seg.max()) >= 2  # several documents to a row
        lone = one_per_row(batch)
        assert lone[0].shape[0] > x.shape[0] and int((lone[1] != IGNORE).sum()) == int((y != IGNORE).sum())
        a = packed.train_step(0, micro_batches(batch, x.shape[0]))
        b = alone.train_step(0, micro_batches(lone, lone[0].shape[0]))
        assert a["budget"] == b["budget"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    wa = dict(packed.model.named_parameters())
    worst = max(float((p - wa[n]).detach().abs().max()) for n, p in alone.model.named_parameters())
    assert worst <= 1e-5, worst  # and the trained weights agree after the steps
