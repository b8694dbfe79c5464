"""A tiny random NemotronH MoE parent through the whole pipeline, by the CLI: importance (REAP) ->
two-stage elastic training over the expert axes -> frozen budgets, one given as an active-parameter
target -> slice -> HF export -> transformers loads it with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import NemotronHForCausalLM

import nestlm
from nestlm.cli import main
from nestlm.elastic.arch import ArchSpec
from tests.moe_models import SHAPES, make_moe
from tests.pipeline import pattern_tokens, rank, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_moe_parent_end_to_end(tmp_path: Path) -> None:
    hf = make_moe(tmp_path / "hf", seed=2, **SHAPES["g1-k1-nonorm-bias"])
    data, g = pattern_tokens(tmp_path / "tokens.jsonl")
    ranked = rank(hf, data, tmp_path / "ranked")
    parent = nestlm.load(ranked)
    active_full = parent.num_parameters() - 2 * 48 * 16 * (6 - 1) * 2  # one routed expert of six per token
    elastic = {
        "budgets": {"full": 1.0, "small": "active=0.7"},
        "axes": {
            "hidden": [1.0, 0.75],
            "moe_experts": [1.0, 4, 2],
            "moe_ffn": [1.0, 0.75, 0.5],
            "moe_shared_ffn": [1.0, 0.5],
        },
        "d_router": 32,
    }
    run = train_tiny(tmp_path, "moe-tiny", ranked, data, elastic)
    model = nestlm.load(run).eval()
    assert model.budgets == ["full", "small"]
    budget = model.elastic["small"]
    cfg = model.config
    assert budget.active_params == budget.arch.active_parameters(cfg)
    assert abs(budget.active_params / (0.7 * ArchSpec.full(cfg).active_parameters(cfg)) - 1) <= 0.05
    saved = json.loads((run / "elastic.json").read_text())
    assert json.dumps(saved).count("active_params") >= 2  # both counts recorded per budget
    stages = {json.loads(line).get("stage") for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"short", "long"} <= stages

    out = tmp_path / "small-hf"
    assert main(["slice", "--model", str(run), "--budget", "small", "--out", str(out), "--format", "hf"]) == 0
    small = NemotronHForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in small.parameters()) == budget.params
    # the active count (computed at freezing, written to elastic.json, read back above) against one counted here
    # on the exported model: every parameter but those of the routed experts a token is not sent to
    idle, k = 0, small.config.num_experts_per_tok
    for block in (b for b in small.model.layers if b.block_type == "moe"):
        experts = list(block.mixer.experts.parameters())  # (experts, ...) tensors, one row per routed expert
        n_experts = experts[0].shape[0]
        assert n_experts > k and all(w.shape[0] == n_experts for w in experts)
        idle += (n_experts - k) * sum(w[0].numel() for w in experts)
    active = sum(p.numel() for p in small.parameters()) - idle
    assert budget.active_params == saved["small"]["active_params"] == active, (budget.active_params, active)
    ids = torch.randint(3, 97, (2, 32), generator=g)
    with torch.no_grad():
        diff = (small(ids, use_cache=False).logits - model(ids, budget="small").logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert active_full > budget.active_params
