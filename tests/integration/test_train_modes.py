"""Other training modes on the tiny recipe: soft masks, heterogeneous routers, depth, trainable teacher,
activation checkpointing, plain CE training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train

FAST = ["data.max_bytes=80000", "stages.0.steps=8", "stages.1.steps=4", "train.checkpoint_every=0"]


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


@pytest.mark.parametrize(
    "overrides",
    [
        ["elastic.mask=soft"],
        ["elastic.heterogeneous=true"],
        ["elastic.axes.depth=[0,1,2]"],
        ["elastic.trainable_teacher=true"],
        ["train.activation_checkpointing=true", "train.grad_accum=2"],
    ],
    ids=["soft", "heterogeneous", "depth", "trainable-teacher", "checkpointing-accum"],
)
def test_modes_train_and_freeze(tmp_path: Path, overrides: list[str]) -> None:
    out = tmp_path / "run"
    train(load_recipe("tiny", FAST + overrides), out, progress=False)
    r = rows(out)
    assert len(r) == 12 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r)
    model = nestlm.load(out)
    assert model.budgets == ["full", "75", "50"]
    ids = torch.randint(3, 259, (1, 24))
    for name in model.budgets:  # every frozen budget runs and slices to the same logits
        with torch.no_grad():
            assert (model.slice(name)(ids).logits - model(ids, budget=name).logits).abs().max() <= 1e-5
    if "elastic.axes.depth=[0,1,2]" in overrides:
        assert all(model.budget(n).arch.layers.count(None) <= 2 for n in model.budgets)


def test_activation_checkpointing_gives_the_same_losses(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_recipe("tiny", FAST), a, progress=False)
    train(load_recipe("tiny", FAST + ["train.activation_checkpointing=true"]), b, progress=False)
    la, lb = [x["loss"] for x in rows(a)], [x["loss"] for x in rows(b)]
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= 1e-5


def test_plain_mode_lowers_cross_entropy(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    train(load_recipe("tiny", FAST + ["train.mode=plain", "stages.0.steps=30"]), out, progress=False)
    r = rows(out)
    assert "ce" in r[0] and "kd" not in r[0]
    assert sum(x["ce"] for x in r[-3:]) < sum(x["ce"] for x in r[:3])
    assert nestlm.load(out).budgets == []
