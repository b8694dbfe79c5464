"""Tiny random Transformer parents (llama, mistral, qwen2, qwen3) built with transformers from configs.

``SHAPES`` covers GQA and MHA, tied and untied embeddings, attention biases (all four
projections, or q/k/v only as Qwen2 has them), MLP biases, per-head q/k RMSNorm (Qwen3), an
explicit head_dim that hidden_size / heads does not imply, and Llama 3.x RoPE scaling written
both as ``rope_scaling`` (published checkpoints) and as ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that the tiny head_dim has frequencies in all three llama3 bands
    "original_max_position_embeddings": 64,
}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-gqa-untied-llama3-rope_scaling": dict(family="llama", rope=LLAMA3, spelling="rope_scaling"),
    "llama-mha-tied-biases-llama3-rope_parameters": dict(
        family="llama",
        num_key_value_heads=4,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope=LLAMA3,
        spelling="rope_parameters",
    ),
    "mistral-gqa-head_dim": dict(
        family="mistral", sliding_window=None, num_attention_heads=6, num_key_value_heads=2, head_dim=8
    ),
    "qwen2-gqa-tied-qkv-bias": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3-gqa-qknorm-head_dim": dict(family="qwen3", head_dim=12),
    "qwen3-mha-qknorm-bias": dict(family="qwen3", num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True),
}
FAMILY_OF = {name: kw["family"] for name, kw in SHAPES.items()}


def hf_classes(family: str) -> tuple[type, type]:
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")


def make_transformer(path: Path, family: str = "llama", seed: int = 0, dtype: torch.dtype | None = None, **kw) -> Path:
    """A random ``family`` model (transformers) saved to ``path``; ``rope``/``spelling`` set RoPE scaling.

    Norm weights and biases are randomised too (no parameter left at 1 or 0, where a
    permutation or a missing term would hide), and weights are large enough (std 0.1) that
    every block moves the logits well above the 1e-4 tolerance.
    """
    config_cls, model_cls = hf_classes(family)
    rope = kw.pop("rope", None)
    spelling = kw.pop("spelling", "rope_parameters")
    args: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    args.update(kw)
    if rope is not None:
        args["rope_parameters"] = dict(rope, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if rope is not None and spelling == "rope_scaling":  # as published Llama 3.x config.json files say it
        raw = json.loads((path / "config.json").read_text())
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = params
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def make_shape(path: Path, name: str, seed: int = 0, **extra) -> Path:
    kw = dict(SHAPES[name])
    return make_transformer(path, kw.pop("family"), seed=seed, **kw, **extra)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (transformers counts pads without them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
