"""Tiny elastic models with budgets built by hand, for the decoding tests (schedules, speculative)."""

from __future__ import annotations

import torch

import nestlm
from nestlm.checkpoint import Budget
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, closest_homogeneous, parse_target


def with_budgets(model: nestlm.HybridLM, targets=(("full", "1.0"), ("75", "0.75"), ("50", "0.5"))) -> nestlm.HybridLM:
    cfg = model.config
    total = ArchSpec.full(cfg).num_parameters(cfg)
    for name, target in targets:
        spec = ArchSpec.full(cfg) if target == "1.0" else closest_homogeneous(cfg, parse_target(target))
        n = spec.num_parameters(cfg)
        model.elastic[name] = Budget(name=name, target=target, arch=spec, params=n, fraction=n / total)
    return model


def hybrid(seed: int = 0, eos: int | None = None, vocab: int = 259, init_std: float = 0.25, **kw) -> nestlm.HybridLM:
    """A random hybrid (Mamba, attention with RoPE, MLP) with budgets full / 75 / 50.

    init_std 0.25 gives varied greedy continuations (not a short cycle) and drafts that disagree
    with the target often enough for rounds with none, some and all drafts accepted.
    """
    args = dict(
        vocab_size=vocab,
        hidden_size=48,
        mamba_heads=4,
        mamba_head_dim=12,
        mamba_groups=2,
        d_state=16,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=12,
        ffn=96,
        mamba_chunk_size=16,
        rope_theta=1e4,
        eos_token_id=eos,
        pad_token_id=0,
        init_std=init_std,
    )
    args.update(kw)
    cfg = ModelConfig.from_pattern(args.pop("pattern", "M*-M-*M-"), **args)
    model = nestlm.HybridLM(cfg).eval()
    model.reset_parameters(seed=seed)
    return with_budgets(model)


def llama(seed: int = 0, eos: int | None = None, init_std: float = 0.25) -> nestlm.HybridLM:
    """A Transformer parent as nestlm holds one (attention + SwiGLU MLP blocks, RoPE), with budgets."""
    cfg = ModelConfig.from_pattern(
        "*-*-*-",
        vocab_size=259,
        hidden_size=48,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=12,
        ffn=96,
        mlp_act="swiglu",
        rope_theta=1e4,
        eos_token_id=eos,
        pad_token_id=0,
        init_std=init_std,
    )
    model = nestlm.HybridLM(cfg).eval()
    model.reset_parameters(seed=seed)
    return with_budgets(model)


def prompts(n: int, length: int, seed: int, vocab: int = 259) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
