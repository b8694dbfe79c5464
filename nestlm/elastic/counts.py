"""Exact parameter and memory counts of a ModelConfig, as plain arithmetic.

Ints give the exact count of a HybridLM built from the config (``ArchSpec.num_parameters`` is
this on the sliced config); tensors (a router's expected widths) give a differentiable one. A MoE
layer counts twice: its total parameters, and the *active* ones a token runs through (the
router, the shared expert and ``top_k`` routed experts).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import LayerSpec, ModelConfig

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def block_parameters(
    config: ModelConfig,
    kind: str,
    D: Any,
    heads: Any = 0,
    head_dim: Any = 0,
    groups: Any = 0,
    d_state: Any = 0,
    kv_heads: Any = 0,
    ffn: Any = 0,
    experts: Any = 0,
    shared_ffn: Any = 0,
    active: bool = False,
) -> Any:
    """Parameters of one block (pre-norm included) as plain arithmetic, so that ints give the exact
    count and tensors (expected widths under a router's probabilities) give a differentiable one.
    ``active``: a MoE block counts ``moe_top_k`` routed experts instead of all of them."""
    n = D  # pre-norm
    if kind == "mamba":
        HP, bc = heads * head_dim, 2 * groups * d_state
        rows = 2 * HP + bc + heads
        n = n + D * rows + (rows if config.mamba_proj_bias else 0)  # in_proj
        n = n + (HP + bc) * config.mamba_conv_kernel + ((HP + bc) if config.mamba_conv_bias else 0)  # conv1d
        n = n + 3 * heads + HP  # dt_bias, A_log, D, gated-norm weight
        n = n + HP * D + (D if config.mamba_proj_bias else 0)  # out_proj
    elif kind == "attention":
        q, kv = heads * head_dim, kv_heads * head_dim
        n = n + D * (q + 2 * kv) + q * D
        if config.attention_bias:
            n = n + q + 2 * kv
        if config.o_proj_bias:
            n = n + D
        if config.attention_qk_norm:  # q_norm, k_norm: one weight per head channel, shared by the heads
            n = n + 2 * head_dim
    elif kind == "moe":
        routed = config.moe_top_k if active else experts
        n = n + experts * D  # router (the selection bias is a buffer, not a parameter)
        n = n + routed * 2 * D * ffn  # relu2 experts: up (E, ffn, D), down (E, D, ffn)
        n = n + 2 * D * shared_ffn + ((shared_ffn + D) if config.mlp_bias else 0)  # the shared expert
    else:
        mats = 3 if config.mlp_act == "swiglu" else 2
        n = n + mats * D * ffn
        if config.mlp_bias:
            n = n + (mats - 1) * ffn + D
    return n


def block_cache_bytes(
    config: ModelConfig,
    kind: str,
    batch: int,
    context: int,
    b: int,
    heads: Any = 0,
    head_dim: Any = 0,
    groups: Any = 0,
    d_state: Any = 0,
    kv_heads: Any = 0,
) -> Any:
    """Inference-state bytes of one block: KV cache (attention), conv + fp32 SSM state (Mamba)."""
    if kind == "attention":
        return 2 * batch * context * kv_heads * head_dim * b
    if kind == "mamba":
        conv = batch * (heads * head_dim + 2 * groups * d_state) * (config.mamba_conv_kernel - 1) * b
        return conv + batch * heads * head_dim * d_state * 4
    return 0


def _widths(ls: LayerSpec) -> dict[str, int]:
    return {k: v for k, v in ls.to_dict().items() if k != "kind"}


def layer_parameters(config: ModelConfig, ls: LayerSpec, hidden: int | None = None, active: bool = False) -> int:
    """Parameters of one block (its pre-norm included) at hidden size ``hidden`` (``active``: see above)."""
    D = config.hidden_size if hidden is None else hidden
    return block_parameters(config, ls.kind, D, **_widths(ls), active=active)


def count_parameters(config: ModelConfig, active: bool = False) -> int:
    """Exact parameter count of a HybridLM built from ``config``; ``active``: per token (MoE: top-k experts)."""
    D, V = config.hidden_size, config.vocab_size
    n = V * D + D + (0 if config.tie_embeddings else V * D)  # embeddings, norm_f, lm_head
    return n + sum(layer_parameters(config, ls, active=active) for ls in config.layers)


def active_parameters(config: ModelConfig) -> int:
    """Parameters one token runs through: everything but the routed experts it is not sent to."""
    return count_parameters(config, active=True)


def memory_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, batch: int = 1, context: int = 4096) -> int:
    """Weights + KV cache + conv state in ``dtype``, SSM state in fp32, at a batch size and context length."""
    b = DTYPE_BYTES[dtype]
    total = count_parameters(config) * b
    for ls in config.layers:
        w = {k: v for k, v in _widths(ls).items() if k not in ("ffn", "experts", "shared_ffn")}
        total += block_cache_bytes(config, ls.kind, batch, context, b, **w)
    return total
