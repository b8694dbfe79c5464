"""NemotronH MoE parents: nestlm equals transformers on the same weights (fp32, CPU).

Three tiny random MoE configs (tests/moe_models.py) cover group-limited routing (4 groups with
the best 2 chosen; 2 groups with the best 1), one group, top-k 1, 2 and 3, norm_topk_prob on and
off, routed_scaling_factor 1, 1.7 and 2.5, a shared expert with and without bias, and widths
that are not powers of two. The selection is made to matter: a test shows that zeroing the
selection bias, or removing the group mask, changes the chosen experts of >= 20% of tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import NemotronHForCausalLM

import nestlm
from nestlm.model import InferenceCache, route
from tests.moe_models import SHAPES, gate_inputs, load_hf, make_moe

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 8


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_moe(tmp_path_factory.mktemp(request.param) / "hf", seed=5, **SHAPES[request.param])
    return load_hf(path, request.param).eval(), nestlm.load(path).eval(), request.param


def _ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :], mask[i, L - len(r) :] = r, 1
    return ids, mask


def test_load_reads_the_moe_shape_and_counts(pair) -> None:
    hf, ours, _ = pair
    c = hf.config
    moe = [ls for ls in ours.config.layers if ls.kind == "moe"]
    assert len(moe) == c.layers_block_type.count("moe") >= 2
    assert {(ls.experts, ls.ffn, ls.shared_ffn) for ls in moe} == {
        (c.n_routed_experts, c.moe_intermediate_size, c.moe_shared_expert_intermediate_size)
    }
    oc = ours.config
    assert (oc.moe_top_k, oc.moe_n_group, oc.moe_topk_group) == (c.num_experts_per_tok, c.n_group, c.topk_group)
    assert (oc.moe_norm_topk_prob, oc.moe_routed_scaling_factor) == (c.norm_topk_prob, c.routed_scaling_factor)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert ours.num_parameters() == n_hf == nestlm.ArchSpec.full(oc).num_parameters(oc)
    # active: everything but the routed experts a token is not sent to
    per_expert = 2 * c.hidden_size * c.moe_intermediate_size
    idle = len(moe) * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    assert nestlm.ArchSpec.full(oc).active_parameters(oc) == n_hf - idle


def test_selection_is_not_trivial(pair) -> None:
    """The bias and the group mask each decide >= 20% of tokens' experts, so a bug in either shows."""
    hf, ours, name = pair
    c = hf.config
    for i, x in gate_inputs(hf, _ids(c.vocab_size, 2, 48, seed=11)).items():
        gate = hf.model.layers[i].mixer.gate
        W, b = gate.weight, gate.e_score_correction_bias
        args = (c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)

        def chosen(bias: torch.Tensor, topk_group: int | None = None, x=x, W=W, args=args) -> torch.Tensor:
            a = list(args)
            if topk_group is not None:
                a[2] = topk_group
            return route(x, W, bias, *a)[0].sort(-1).values

        with torch.no_grad():
            _, ref_w, ref_idx = gate(x)
            idx, w = route(x, W, b, *args)
            assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values), i
            assert (w.gather(1, idx.argsort(-1)) - ref_w.gather(1, ref_idx.argsort(-1))).abs().max() <= 1e-6
            base = chosen(b)
            no_bias = (chosen(torch.zeros_like(b)) != base).any(-1).float().mean().item()
            assert no_bias >= 0.2, (i, no_bias)
            if c.n_group > 1:
                no_mask = (chosen(b, topk_group=c.n_group) != base).any(-1).float().mean().item()
                assert no_mask >= 0.2, (i, no_mask)


@pytest.mark.parametrize("length", [1, 7, 40])
def test_logits_match_transformers(pair, length: int) -> None:
    hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, 2, length, seed=length)
    with torch.no_grad():
        a, b = hf(ids, use_cache=False).logits, ours(ids).logits
    diff = (a - b).abs().max().item()
    assert diff <= 1e-4, diff
    assert a.std().item() > 0.1


def test_greedy_tokens_match_transformers(pair) -> None:
    hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, 3, 12, seed=3)
    # transformers 5.25's cache fails on a model whose first layer is MoE or MLP ('DummyLayer' object has no
    # attribute 'get_seq_length'): its uncached greedy loop is the reference there
    first_cached = hf.config.layers_block_type[0] not in ("moe", "mlp")
    a = hf.generate(ids, max_new_tokens=NEW, do_sample=False, use_cache=first_cached)
    b = ours.generate(ids, max_new_tokens=NEW)
    assert torch.equal(a, b), (a[:, 12:], b[:, 12:])
    assert len(set(b[:, 12:].flatten().tolist())) >= 3


def test_left_padded_rows_equal_each_row_alone(pair) -> None:
    hf, ours, _ = pair
    rows = [_ids(hf.config.vocab_size, 1, n, seed=30 + n)[0] for n in (11, 6, 9)]
    ids, mask = _left_pad(rows)
    L = ids.shape[1]
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = ours(r[None]).logits[0]
            assert (got[i, L - len(r) :] - alone).abs().max().item() <= 1e-4, i
            ref = hf(r[None], use_cache=False).logits[0]
            assert (alone - ref).abs().max().item() <= 1e-4, i
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for i, r in enumerate(rows):
        assert torch.equal(b[i, L:], ours.generate(r[None], max_new_tokens=NEW)[0, len(r) :]), i


def test_cached_decode_equals_uncached_forward(pair) -> None:
    _, ours, _ = pair
    rows = [_ids(ours.config.vocab_size, 1, n, seed=20 + n)[0] for n in (9, 5)]
    ids, mask = _left_pad(rows)
    more = _ids(ours.config.vocab_size, 2, 6, seed=7)
    cache = InferenceCache(ours.config.n_layers)
    with torch.no_grad():
        steps = [ours(ids, attention_mask=mask, cache=cache).logits]
        steps += [ours(more[:, t : t + 1], cache=cache).logits for t in range(more.shape[1])]
        cached = torch.cat(steps, dim=1)
        for i, r in enumerate(rows):
            full = ours(torch.cat([r, more[i]])[None]).logits[0]
            diff = (cached[i, ids.shape[1] - len(r) :] - full).abs().max().item()
            assert diff <= 1e-4, (i, diff)


def test_a_wrong_router_is_caught(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights from the biased scores (a plausible bug) move the logits far beyond the tolerance."""
    hf, ours, _ = pair
    import nestlm.model as m

    real = m.route

    def biased_weights(x, weight, bias, *a):
        index, w = real(x, weight, bias, *a)
        return index, w + bias.float()[index]

    monkeypatch.setattr(m, "route", biased_weights)
    ids = _ids(hf.config.vocab_size, 2, 24, seed=1)
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - ours(ids).logits).abs().max().item()
    assert diff > 1e-3, diff


def test_bf16_checkpoint_keeps_the_router_in_fp32(tmp_path) -> None:
    """bf16 weights, fp32 router. Without Mamba layers (whose bf16 rounding differs from transformers'
    and, through near-tied choices, flips experts) nestlm's bf16 logits stay next to transformers'."""
    shape = SHAPES["g4-top2groups-k3-norm-scaled"] | {"layers_block_type": ["moe", "moe", "full_attention", "moe"]}
    path = make_moe(tmp_path / "bf16", dtype=torch.bfloat16, **shape)
    hf = NemotronHForCausalLM.from_pretrained(path).eval()
    ours = nestlm.load(path).eval()
    moe = ours.layers[1].mixer
    assert moe.gate.weight.dtype == moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.up_proj.dtype == ours.embeddings.weight.dtype == torch.bfloat16
    ids = _ids(101, 2, 16, seed=0)
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids, use_cache=False).logits
    assert torch.isfinite(a).all() and (a - b).abs().max().item() <= 0.02 * b.abs().max().item()
    assert ours.generate(ids, max_new_tokens=4).shape == (2, 20)
    cast = nestlm.load(path, dtype=torch.float32).to(torch.bfloat16)  # a cast keeps the router in fp32 too
    assert cast.layers[1].mixer.gate.weight.dtype == torch.float32
