"""A tiny random Llama parent through the whole pipeline, by the CLI: importance -> two-stage elastic
training (recipe model.path = the Llama directory) -> frozen budgets -> slice -> HF export -> transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import nestlm
from nestlm.cli import main
from tests.pipeline import pattern_tokens, rank, train_tiny
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
    data, g = pattern_tokens(tmp_path / "tokens.jsonl")
    ranked = rank(hf, data, tmp_path / "ranked")
    parent = nestlm.load(hf)
    assert nestlm.load(ranked).importance.reordered

    elastic = {
        "budgets": {"full": 1.0, "60": 0.6},
        "axes": {"hidden": [1.0, 0.75, 0.5], "attn_heads": [1.0, 0.5], "mlp": [1.0, 0.75, 0.5, 0.25]},
        "d_router": 32,
    }
    run = train_tiny(tmp_path, "llama-tiny", ranked, data, elastic)
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
