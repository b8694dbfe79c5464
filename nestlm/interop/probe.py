"""What the installed transformers can run, found by running it on a tiny model (not guessed from its version)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def transformers_fails_first_layer(kind: str) -> str | None:
    """The error with which the installed transformers fails to run a NemotronH model whose first
    layer is ``kind`` ("mlp" or "moe"), or None when it runs it. transformers 5.23 to 5.25 build the
    generation cache of such a model with a DummyLayer first and then ask that layer for the sequence
    length, in every forward that uses the cache (generate, or a plain forward, whose use_cache
    defaults to true). Probed on a tiny model, not guessed from the version, so that a fixed release
    is used as soon as it is installed."""
    try:
        from transformers import NemotronHConfig, NemotronHForCausalLM
    except ImportError:  # nothing to run it with here: nothing to refuse
        return None
    cfg = NemotronHConfig(
        vocab_size=8,
        hidden_size=8,
        layers_block_type=[kind, "linear_attention"],
        mamba_num_heads=2,
        mamba_head_dim=4,
        n_groups=1,
        ssm_state_size=4,
        intermediate_size=8,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        moe_shared_expert_intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        chunk_size=4,
    )
    try:
        with torch.no_grad():
            NemotronHForCausalLM(cfg).eval()(torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    except Exception as e:  # noqa: BLE001 (any failure means the export would not run there)
        return f"{type(e).__name__}: {e}"
    return None


def transformers_version() -> str:
    import transformers

    return transformers.__version__
