"""benchmarks/grow_parent.py: inserted attention layers keep the parent's function exactly."""

from __future__ import annotations

import pytest
import torch

from nestlm import HybridLM, ModelConfig
from tests.benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(
    vocab_size=53,
    hidden_size=32,
    mamba_heads=4,
    mamba_head_dim=8,
    mamba_groups=2,
    d_state=8,
    attn_heads=4,
    kv_heads=2,
    attn_head_dim=8,
    ffn=48,
    mamba_chunk_size=8,
)


def test_grown_parent_has_the_parents_logits_and_the_inserted_layers_parameters() -> None:
    grow = load_benchmark("grow_parent")
    torch.manual_seed(0)
    parent = HybridLM(ModelConfig.from_pattern("M-M*-", **CFG)).eval()
    grown = grow.grow(parent, [0, 3], seed=1).eval()
    assert grown.config.pattern == "M*-M**-"
    # one attention block: pre-norm weight H, q and o H x (heads x head_dim), k and v H x (kv_heads x head_dim)
    h, q, kv = 32, 4 * 8, 2 * 8
    assert grown.num_parameters() == parent.num_parameters() + 2 * (h + 2 * h * q + 2 * h * kv)
    ids = torch.randint(1, 53, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, parent(ids).logits, rtol=0, atol=1e-6)
    # the inserted layers are real attention blocks that training can move: only their output is zero
    assert grown.layers[1].mixer.o_proj.weight.abs().max() == 0
    assert grown.layers[1].mixer.q_proj.weight.abs().max() > 0
    with pytest.raises(SystemExit, match="distinct layer indices within 0..4"):
        grow.grow(parent, [5])
