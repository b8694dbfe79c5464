"""train.kd_chunk_tokens: the trainer's chunked KD / CE gives the losses and weights of the full-logit path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nestlm.train.recipe import load_recipe
from nestlm.train.trainer import train

FAST = ["data.max_bytes=40000", "stages.0.steps=3", "stages.1.steps=2", "train.checkpoint_every=0"]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r.get("kd", r["loss"]) for r in rows if "loss" in r] + [
        v for r in rows if "val" in r for v in r["val"].values()
    ]


@pytest.mark.parametrize(
    "overrides",
    [[], ["elastic.mask=soft"], ["elastic.trainable_teacher=true"], ["train.mode=plain"]],
    ids=["hard", "soft", "trainable-teacher", "plain"],
)
def test_chunked_losses_equal_full_logits(tmp_path: Path, overrides: list[str]) -> None:
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    train(load_recipe("tiny", FAST + overrides), full, progress=False)
    train(load_recipe("tiny", [*FAST, *overrides, "train.kd_chunk_tokens=37"]), chunked, progress=False)
    a, b = _losses(full), _losses(chunked)
    assert len(a) == len(b) >= 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5
    wa, wb = load_file(full / "model.safetensors"), load_file(chunked / "model.safetensors")
    # AdamW divides by sqrt(v): where a gradient is ~0, float noise of 1e-7 moves a weight by up to lr-sized
    # steps' fractions, so the weights agree to 1e-4 (lr 1e-3, 5 steps) while every loss agrees to 1e-5
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
