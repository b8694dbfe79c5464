"""Nemotron 3 Nano 30B-A3B's shape, built on the meta device: exact total and active counts (about 31.6B / 3.6B)."""

from __future__ import annotations

import torch

from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, Target
from nestlm.model import HybridLM
from tests.unit.test_router import CFG, _combos, _one_hot, _routers

# 52 layers: 23 Mamba2, 23 MoE, 6 attention (NVIDIA-Nemotron-3-Nano-30B-A3B's config.json values)
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def nano_config() -> ModelConfig:
    return ModelConfig.from_pattern(
        NANO_PATTERN, vocab_size=131072, hidden_size=2688, mamba_heads=64, mamba_head_dim=64, mamba_groups=8,
        d_state=128, attn_heads=32, kv_heads=2, attn_head_dim=128, experts=128, expert_ffn=1856, shared_ffn=3712,
        moe_top_k=6, moe_n_group=1, moe_topk_group=1, moe_routed_scaling_factor=2.5,
    )  # fmt: skip


def test_nano_counts_on_the_meta_device() -> None:
    cfg = nano_config()
    assert (NANO_PATTERN.count("M"), NANO_PATTERN.count("E"), NANO_PATTERN.count("*")) == (23, 23, 6)
    with torch.device("meta"):
        model = HybridLM(cfg)
    full = ArchSpec.full(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert full.num_parameters(cfg) == total == 31_577_937_344
    per_expert = 2 * 2688 * 1856
    assert full.active_parameters(cfg) == total - 23 * (128 - 6) * per_expert == 3_580_073_408
    # fewer, narrower experts: both counts fall by exactly what the experts held
    small = full.replace(cfg, experts=64, expert_ffn=1024)
    assert small.num_parameters(cfg) == total - 23 * (128 * 1856 - 64 * 1024) * 2 * 2688 - 23 * 64 * 2688
    assert small.active_parameters(cfg) == (
        full.active_parameters(cfg) - 23 * 6 * 2 * 2688 * (1856 - 1024) - 23 * 64 * 2688
    )


def test_router_costs_of_a_moe_parent_are_exact() -> None:
    """Routers over the existing axes of a parent with MoE layers (kept at full width) count exactly."""
    cfg = ModelConfig.from_pattern("M*E-E", experts=6, expert_ffn=12, shared_ffn=10, moe_top_k=2, **CFG)
    routers = _routers(cfg)
    kw = dict(dtype=torch.bfloat16, batch=2, context=64)
    for choice in _combos(routers, {a: 1 for a in routers.choices})[::5]:
        sample = _one_hot(routers, choice)
        spec = routers.arch(sample.choice)
        assert int(round(float(routers.expected_cost(sample, Target("params", 1e4))))) == spec.num_parameters(cfg)
        assert int(round(float(routers.expected_cost(sample, Target("memory", 1e6), **kw)))) == spec.memory_bytes(
            cfg, **kw
        )
