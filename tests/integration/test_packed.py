"""Packed documents: ``model(ids, segment_ids=seg)`` equals each document run alone, logits and gradients.

Documents of 5, 13, 1 and 19 tokens (and 20 + 18 in a second row) straddle the scan chunk of 8: the
Mamba state, the conv window, attention and RoPE must all restart at each document's first token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlm import HybridLM
from nestlm.cache import InferenceCache
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec

ROWS = [[5, 13, 1, 19], [20, 18]]  # two rows of 38 tokens
COMMON = dict(vocab_size=97, hidden_size=32, attn_heads=4, kv_heads=2, attn_head_dim=8, ffn=48, init_std=0.2)
MAMBA = dict(mamba_heads=4, mamba_head_dim=8, mamba_groups=2, d_state=8, mamba_chunk_size=8)
PARENTS = {
    "nemotron_h": lambda: ModelConfig.from_pattern("M*-M-*M", **COMMON, **MAMBA),
    "nemotron_h_moe": lambda: ModelConfig.from_pattern(
        "ME*EM",
        **COMMON,
        **MAMBA,
        experts=8,
        expert_ffn=16,
        shared_ffn=12,
        moe_top_k=2,
        moe_n_group=2,
        moe_topk_group=1,
    ),  # fmt: skip
    "llama": lambda: ModelConfig.from_pattern("*-*-*-", **COMMON, mlp_act="swiglu", rope_theta=1e4),
}


def parent(name: str, seed: int = 0) -> HybridLM:
    model = HybridLM(PARENTS[name]())
    model.reset_parameters(seed=seed)
    return model.eval()


def docs_and_segments(rows: list[list[int]], vocab: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(3, vocab, (n,), generator=g) for n in row] for row in rows]
    ids = torch.stack([torch.cat(row) for row in docs])  # (B, L)
    seg = torch.stack([torch.cat([torch.full((len(d),), 10 * j + 3) for j, d in enumerate(row)]) for row in docs])
    return docs, ids, seg


def targets_of(row: list[torch.Tensor]) -> torch.Tensor:
    """Next-token targets within each document (its last token has none: -100)."""
    return torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in row])


def check_packed_equals_alone(model: HybridLM, **kw) -> None:
    docs, ids, seg = docs_and_segments(ROWS)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, **kw).logits
        alone = torch.stack([torch.cat([model(d[None], **kw).logits[0] for d in row]) for row in docs])
        crossed = model(ids, **kw).logits  # without boundaries the later documents see the earlier ones
    diff = float((packed - alone).abs().max())
    assert diff <= 1e-5, diff
    assert float((crossed - alone).abs().max()) > 1e-3

    # gradients: the packed loss (a sum over tokens) against the documents' losses summed
    y = torch.stack([targets_of(row) for row in docs])
    model.zero_grad()
    F.cross_entropy(model(ids, segment_ids=seg, **kw).logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for row in docs:
        for d in row:
            logits = model(d[None], **kw).logits[0]
            F.cross_entropy(logits, torch.cat([d[1:], torch.tensor([-100])]), reduction="sum").backward()
    g_alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert g_packed.keys() == g_alone.keys() and g_packed
    scale = max(float(g.abs().max()) for g in g_alone.values())
    worst = max(float((g_packed[n] - g_alone[n]).abs().max()) for n in g_alone)
    assert worst <= 1e-5 * max(1.0, scale), (worst, scale)


@pytest.mark.parametrize("name", list(PARENTS))
def test_packed_documents_equal_each_document_alone(name: str, one_thread: None) -> None:
    check_packed_equals_alone(parent(name))


def test_packed_documents_at_a_nested_budget(one_thread: None) -> None:
    model = parent("nemotron_h", seed=1)
    spec = ArchSpec.full(model.config).replace(hidden=24, mlp=24, mamba_heads=2, attn_heads=2, drop_layers=[4])
    check_packed_equals_alone(model, arch=spec)


def test_packed_documents_under_soft_router_masks(one_thread: None) -> None:
    """The masks of router training (soft, not one-hot: every choice mixed in) change nothing about packing."""
    from nestlm.elastic import training as el
    from nestlm.elastic.router import RouterSample
    from nestlm.train import setup
    from nestlm.train.recipe import load_recipe

    r = load_recipe("tiny", ["model.init.mamba_chunk_size=8"])
    model = setup.build_parent(r).eval()
    routers = el.make_routers(model.config, r.elastic, 2, None)
    g = torch.Generator().manual_seed(5)
    probs = {a: torch.softmax(torch.randn(rt.rows, len(routers.choices[a]), generator=g), -1)
             for a, rt in routers.routers.items()}  # fmt: skip
    sample = RouterSample(probs, {a: p.argmax(-1) for a, p in probs.items()})
    check_packed_equals_alone(model, tap=routers.soft_tap(sample))


def test_padding_free_position_ids_mark_the_documents(one_thread: None) -> None:
    """transformers' padding-free convention: position ids restarting at 0, no segment ids."""
    for name in ("llama", "nemotron_h"):
        model = parent(name)
        docs, ids, seg = docs_and_segments(ROWS)
        pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
        with torch.no_grad():
            by_pos = model(ids, position_ids=pos).logits
            by_seg = model(ids, segment_ids=seg).logits
        assert float((by_pos - by_seg).abs().max()) <= 1e-6


def test_one_segment_equals_no_segments_and_bad_calls_are_refused(one_thread: None) -> None:
    model = parent("llama")
    ids = torch.randint(3, 97, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, segment_ids=torch.zeros_like(ids)).logits, model(ids).logits)
    with pytest.raises(ValueError, match="without a cache"):  # decoding continues one document per row
        model(ids, segment_ids=torch.zeros_like(ids), cache=InferenceCache(model.config.n_layers))
    with pytest.raises(ValueError, match="one per token"):
        model(ids, segment_ids=torch.zeros(2, 20, dtype=torch.long))
