"""A tiny random Llama parent through the whole pipeline, by the CLI: importance -> two-stage elastic
training (recipe model.path = the Llama directory) -> frozen budgets -> slice -> HF export -> transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import nestlm
from nestlm.cli import main
from tests.transformer_models import LLAMA3, make_transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llama_parent_end_to_end(tmp_path: Path, capsys) -> None:
    hf = make_transformer(
        tmp_path / "llama",
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope=LLAMA3,
        spelling="rope_scaling",
        initializer_range=0.05,
    )
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "tokens.jsonl"
    # a learnable stream (runs of a repeated token pattern), pre-tokenized: no tokenizer needed
    rows = []
    for _ in range(24):
        pat = torch.randint(3, 97, (5,), generator=g)
        rows.append(pat.repeat(40).tolist())
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))

    ranked = tmp_path / "ranked"
    argv = ["importance", "--model", str(hf), "--data", str(data), "--out", str(ranked)]
    assert main(argv + ["--seq-len", "64", "--batch-size", "4", "--num-samples", "16"]) == 0
    parent = nestlm.load(hf)
    assert nestlm.load(ranked).importance.reordered

    recipe = {
        "name": "llama-tiny",
        "model": {"path": str(ranked)},
        "data": {"train": str(data), "tokenizer": "bytes", "val_fraction": 0.1},
        "elastic": {
            "budgets": {"full": 1.0, "60": 0.6},
            "axes": {"hidden": [1.0, 0.75, 0.5], "attn_heads": [1.0, 0.5], "mlp": [1.0, 0.75, 0.5, 0.25]},
            "d_router": 32,
        },
        "train": {"lr": 1.0e-3, "checkpoint_every": 100, "threads": 1, "tensorboard": False},
        "stages": [
            {"name": "short", "seq_len": 32, "batch_size": 4, "steps": 12, "budget_probs": "uniform"},
            {"name": "long", "seq_len": 64, "batch_size": 2, "steps": 8, "budget_probs": [0.5, 0.5]},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), "--out", str(run), "--no-progress"]) == 0
    model = nestlm.load(run).eval()
    assert model.budgets == ["full", "60"]
    total = parent.num_parameters()
    n60 = model.num_parameters(budget="60")
    assert abs(n60 / (0.6 * total) - 1) <= 0.05, n60 / total
    stages = {json.loads(line).get("stage") for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"short", "long"} <= stages

    # the evaluation path on the Llama parent's elastic checkpoint: one row per budget
    report = tmp_path / "eval"
    argv = ["eval", "--model", str(run), "--data", str(data), "--out", str(report), "--seq-len", "64"]
    assert main(argv + ["--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "full" in printed and "60" in printed and (report / "eval.json").is_file()

    out = tmp_path / "small-hf"
    assert main(["slice", "--model", str(run), "--budget", "60", "--out", str(out), "--format", "hf"]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["rope_scaling"]["rope_type"] == "llama3"
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(small) is LlamaForCausalLM
    assert sum(p.numel() for p in small.parameters()) == n60
    ids = torch.randint(3, 97, (2, 48), generator=g)
    with torch.no_grad():
        diff = (small(ids, use_cache=False).logits - model(ids, budget="60").logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert torch.equal(
        small.generate(ids, max_new_tokens=6, do_sample=False), model.generate(ids, max_new_tokens=6, budget="60")
    )
