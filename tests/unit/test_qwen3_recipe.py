"""recipes/qwen3-8b-elastic.yaml checked against Qwen3-8B's own config values, built on the meta device
(8B in fp32 does not fit here): the parent count, every budget reachable by the recipe's axes and
frozen within its tolerance by the routers' freeze, and the counts the recipe's comments quote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.elastic.arch import ArchSpec, count_parameters, parse_target
from nestlm.elastic.router import ElasticRouters, resolve_choices
from nestlm.interop.formats import hf_config_dict
from nestlm.interop.llama import config_from_hf
from nestlm.train.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "qwen3-8b-elastic.yaml"

# Qwen/Qwen3-8B config.json (the values that shape the model)
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def cfg() -> nestlm.ModelConfig:
    return config_from_hf(dict(QWEN3_8B))


def test_parent_count_is_qwen3_8b(cfg) -> None:
    with torch.device("meta"):
        model = nestlm.HybridLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg) == 8_190_735_360
    assert "8,190,735,360 parameters" in RECIPE.read_text()


def test_every_budget_is_reachable_and_frozen_within_tolerance(cfg) -> None:
    recipe = load_recipe("qwen3-8b-elastic")
    assert recipe == load_recipe(str(RECIPE))  # the shipped copy is this file
    el = recipe.elastic
    assert list(el.budgets) == ["8b", "6b", "4b"] and not el.heterogeneous and "depth" not in el.axes
    choices = resolve_choices(cfg, el.axes)
    routers = ElasticRouters(cfg, choices, len(el.budgets), d_router=el.d_router)
    total = count_parameters(cfg)
    for b, (name, value) in enumerate(el.budgets.items()):
        target = parse_target(value)
        spec = routers.freeze(b, target, tolerance=el.tolerance)
        n = spec.num_parameters(cfg)
        assert abs(n / target.params(cfg) - 1) <= el.tolerance, (name, n)
        assert spec.is_homogeneous()
        raw = hf_config_dict(spec.to_config(cfg))  # every budget exports as a Qwen3 directory
        assert raw["model_type"] == "qwen3" and raw["head_dim"] == 128 and raw["num_hidden_layers"] == 36
    assert total == 8_190_735_360
    # the trainer's check: the smallest choice is below the smallest budget
    smallest = routers.arch({a: torch.tensor([len(v) - 1]) for a, v in choices.items()})
    assert smallest.num_parameters(cfg) < 4e9 * (1 - el.tolerance)


def test_counts_quoted_in_the_recipe_are_exact(cfg) -> None:
    quoted = re.findall(r"(\d+) / (\d+) / (\d+)\s*= ([\d,]+)", RECIPE.read_text())
    assert len(quoted) == 4
    full = ArchSpec.full(cfg)
    for hidden, heads, ffn, count in quoted:
        spec = full.replace(cfg, hidden=int(hidden), attn_heads=int(heads), mlp=int(ffn))
        assert spec.num_parameters(cfg) == int(count.replace(",", ""))


def test_dry_run_plans_both_stages_from_the_shipped_shape(capsys: pytest.CaptureFixture) -> None:
    from nestlm.cli import main

    assert main(["train", str(RECIPE), "--dry-run", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    n = count_parameters(config_from_hf(QWEN3_8B))
    assert f"parent: {n:,} parameters" in out
    assert "global batch 1536 = micro-batch 1 x 24 accumulation steps x 64 ranks" in out
    assert "global batch 384 = micro-batch 1 x 6 accumulation steps x 64 ranks" in out
    assert "KD chunk 4096" in out
