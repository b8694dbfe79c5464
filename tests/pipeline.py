"""The CLI pipeline shared by the end-to-end parent tests (MoE, Transformer): tokens -> importance ->
a tiny two-stage elastic recipe trained by `nestlm train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from nestlm.cli import main


def pattern_tokens(path: Path) -> tuple[Path, torch.Generator]:
    """24 pre-tokenized rows, each a random 5-token pattern repeated 40 times (learnable; no tokenizer);
    the file and the generator that drew them (seed 0), for the tests' later draws."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 97, (5,), generator=g).repeat(40).tolist() for _ in range(24)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path, g


def rank(model: Path, data: Path, out: Path) -> Path:
    """`nestlm importance` of ``model`` on ``data`` into ``out``."""
    argv = ["importance", "--model", str(model), "--data", str(data), "--out", str(out)]
    assert main(argv + ["--seq-len", "64", "--batch-size", "4", "--num-samples", "16"]) == 0
    return out


def train_tiny(tmp_path: Path, name: str, ranked: Path, data: Path, elastic: dict[str, Any]) -> Path:
    """`nestlm train` of a two-stage recipe (12 + 8 steps) with ``elastic`` as its elastic section; the run dir."""
    recipe = {
        "name": name,
        "model": {"path": str(ranked)},
        "data": {"train": str(data), "tokenizer": "bytes", "val_fraction": 0.1},
        "elastic": elastic,
        "train": {"lr": 1.0e-3, "checkpoint_every": 100, "threads": 1, "tensorboard": False},
        "stages": [
            {"name": "short", "seq_len": 32, "batch_size": 4, "steps": 12, "budget_probs": "uniform"},
            {"name": "long", "seq_len": 64, "batch_size": 2, "steps": 8, "budget_probs": [0.5, 0.5]},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), "--out", str(run), "--no-progress"]) == 0
    return run
