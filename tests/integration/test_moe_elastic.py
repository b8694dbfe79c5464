"""Experts as elastic axes: importance (REAP) + reorder keep the function; fewer, narrower experts slice
exactly (nested forward == slice, exact total and active counts) and export to plain transformers."""

from __future__ import annotations

import copy

import pytest
import torch

import nestlm
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchError, ArchSpec
from tests.moe_models import SHAPES, load_hf, make_moe

pytestmark = pytest.mark.usefixtures("one_thread")

# shape -> (kept experts, expert width, shared width): fewer experts, narrower experts and shared expert
CUTS = {"g1-k1-nonorm-bias": (4, 12, 8), "g2-top1group-k2-nonorm-odd": (6, 12, 8)}


def _ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CUTS))
def ranked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_moe(tmp_path_factory.mktemp(request.param) / "hf", seed=5, **SHAPES[request.param])
    parent = nestlm.load(path).eval()
    batches = [_ids(parent.config.vocab_size, 4, 32, seed=s) for s in range(3)]
    imp = nestlm.estimate_importance(parent, batches, depth=False, progress=False)
    model = nestlm.reorder(copy.deepcopy(parent), imp)
    return parent, model, imp, request.param, tmp_path_factory.mktemp("out")


def test_reorder_keeps_logits_and_moves_experts(ranked) -> None:
    parent, model, imp, _, _ = ranked
    ids = _ids(parent.config.vocab_size, 2, 24, seed=9)
    with torch.no_grad():
        diff = (parent(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    for i, ls in enumerate(parent.config.layers):
        if ls.kind != "moe":
            continue
        old, new = parent.layers[i].mixer, model.layers[i].mixer
        # which parent expert each new slot holds, found from the router rows (hidden channels permuted too)
        ph = torch.sort(imp.hidden, descending=True, stable=True).indices
        match = (new.gate.weight[:, None, :] == old.gate.weight[None, :, ph]).all(-1)
        perm = match.float().argmax(1)
        assert match.sum().item() == ls.experts and not torch.equal(perm, torch.arange(ls.experts)), perm
        assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[perm])
        G = parent.config.moe_n_group
        assert torch.equal(perm // (ls.experts // G), torch.arange(ls.experts) // (ls.experts // G))  # in-group
        reap = model.importance.layers[i]["expert"].view(G, -1)
        assert (reap[:, :-1] >= reap[:, 1:]).all() and reap.max() > 0  # descending within every group
        neurons = model.importance.layers[i]["expert_neuron"]
        assert (neurons[:, :-1] >= neurons[:, 1:]).all()


def test_fewer_narrower_experts_slice_equals_nested_forward_with_exact_counts(ranked) -> None:
    _, model, _, name, out = ranked
    cfg = model.config
    E, Fe, S = CUTS[name]
    hidden = cfg.hidden_size - 4  # (transformers' default grouped_mm needs rows of 16 bytes)
    spec = ArchSpec.full(cfg).replace(cfg, hidden=hidden, experts=E, expert_ffn=Fe, shared_ffn=S, mlp=16)
    small = model.slice(spec).eval()
    ids = _ids(cfg.vocab_size, 2, 20, seed=4)
    with torch.no_grad():
        nested, sliced = model(ids, arch=spec).logits, small(ids).logits
    assert (nested - sliced).abs().max().item() <= 1e-5
    total = sum(p.numel() for p in small.parameters())
    assert spec.num_parameters(cfg) == total == small.num_parameters()
    n_moe = sum(ls.kind == "moe" for ls in cfg.layers)
    idle = n_moe * (E - cfg.moe_top_k) * 2 * hidden * Fe  # routed experts a token does not use
    assert spec.active_parameters(cfg) == total - idle
    moe = [ls for ls in small.config.layers if ls.kind == "moe"]
    assert {(ls.experts, ls.ffn, ls.shared_ffn) for ls in moe} == {(E, Fe, S)}
    # the slice exported in Hugging Face format loads in plain transformers with the same logits
    nestlm.export_hf(small, out / "hf")
    hf = load_hf(out / "hf", name).eval()
    assert hf.config.n_routed_experts == E and hf.config.moe_intermediate_size == Fe
    assert sum(p.numel() for p in hf.parameters()) == total
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - sliced).abs().max().item()
    assert diff <= 1e-4, diff


def test_expert_constraints_are_refused_in_one_line() -> None:
    cfg = ModelConfig.from_pattern(
        "E*E", vocab_size=50, hidden_size=16, attn_heads=2, kv_heads=2, attn_head_dim=8, experts=8,
        expert_ffn=8, shared_ffn=8, moe_top_k=3, moe_n_group=2, moe_topk_group=1,
    )  # fmt: skip
    full = ArchSpec.full(cfg)
    cases = {
        5: "5 routed experts do not split into moe_n_group=2 groups of at least 2 experts each",
        2: "2 routed experts do not split into moe_n_group=2 groups of at least 2",
        4: "moe_top_k=3 exceeds the 2 experts that moe_topk_group=1 of 2 groups of 2 hold",
        9: "routed experts 9 exceeds the parent's 8",
    }
    for experts, needle in cases.items():
        with pytest.raises(ArchError) as e:
            full.replace(cfg, experts=experts)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ArchError, match="expert width 9 exceeds the parent's 8"):
        full.replace(cfg, expert_ffn=9)
    assert full.replace(cfg, experts=6).num_parameters(cfg) < full.num_parameters(cfg)
