"""Tiny random NemotronH MoE parents built with transformers, with routing that actually decides.

transformers initialises the router with small weights (sigmoid scores cluster near 0.5, the
choice is nearly a tie) and the selection bias at zero, which would hide a selection bug. Here
the router weights are scaled up so that scores separate, and the selection bias is random with
the size of the gaps between scores, so that it changes many choices (tests assert how many).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.conftest import A, M, hf_config

E = "moe"
SHAPES: dict[str, dict[str, Any]] = {
    # 4 groups, the best 2 chosen, 3 experts per token, weights renormalised and scaled
    "g4-top2groups-k3-norm-scaled": dict(
        layers_block_type=[M, E, A, E],
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=20,
    ),
    # one group, one expert per token, raw sigmoid weights, MLP biases (on the shared expert)
    "g1-k1-nonorm-bias": dict(
        layers_block_type=[E, M, E, A],
        n_routed_experts=6,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=12,
        mlp_bias=True,
    ),
    # 2 groups of 5, the best one chosen, 2 per token, no renormalisation, scaled; odd widths.
    # transformers' default experts implementation (grouped_mm) fails on CPU at widths whose rows
    # are not a multiple of 16 bytes ("strides should be multiple of 16 bytes"): run it as eager.
    "g2-top1group-k2-nonorm-odd": dict(
        experts_implementation="eager",
        layers_block_type=[M, E, "mlp", A, E],
        hidden_size=45,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=10,
        mamba_num_heads=9,
        mamba_head_dim=7,
        n_groups=3,
        n_routed_experts=10,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.7,
        moe_intermediate_size=19,
        moe_shared_expert_intermediate_size=13,
    ),
}


def load_hf(path: Path, shape: str) -> Any:
    """transformers' model from ``path`` with the experts implementation ``SHAPES[shape]`` needs."""
    from transformers import NemotronHForCausalLM

    impl = SHAPES[shape].get("experts_implementation")
    return NemotronHForCausalLM.from_pretrained(path, **({} if impl is None else {"experts_implementation": impl}))


def gate_inputs(hf: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The normed hidden states each MoE router of ``hf`` sees for ``ids``: layer -> (tokens, hidden)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block.mixer.gate.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, block in enumerate(hf.model.layers)
        if block.block_type == "moe"
    ]
    with torch.no_grad():
        hf(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def make_moe(
    path: Path,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    router_scale: float = 20.0,
    bias_scale: float = 1.0,
    **kw: Any,
) -> Path:
    """A random NemotronH MoE (transformers) saved to ``path``; returns ``path``.

    Router weights are multiplied by ``router_scale``; each router's selection bias is random
    with ``bias_scale`` times the spread of its scores on random tokens. Norm weights and D are
    randomised as in conftest.make_hf.
    """
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    impl = kw.pop("experts_implementation", None)
    cfg = hf_config(**kw)
    if impl is not None:
        cfg._experts_implementation = impl
    model = NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith((".D", "conv1d.bias")):
                p.copy_(torch.randn_like(p))
            elif name.endswith(".A_log"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("gate.weight"):
                p.mul_(router_scale)
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
        for i, x in gate_inputs(model, ids).items():
            gate = model.model.layers[i].mixer.gate
            spread = torch.sigmoid(x.float() @ gate.weight.float().t()).std().item()
            gate.e_score_correction_bias.copy_(torch.randn(gate.weight.shape[0]) * spread * bias_scale)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path
