"""Speculative decoding with a nested draft: greedy output is plain greedy at the target, token for
token; the rolled-back SSM, conv and KV states equal plain decoding's; batched rows equal their
solo results; the sampling rule gives the target's distribution (tests/unit/test_spec_sampling.py).

Near-ties: a verify forward of k + 1 tokens and step-by-step decoding differ by float rounding
(~3e-6 in the logits), so a mismatch is allowed only where plain decoding's top-2 logit margin is
below 1e-4; :func:`assert_greedy_equal` counts those and the tests require the count to be small.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cache import AttentionState, InferenceCache, MambaState
from nestlm.elastic.arch import ArchSpec
from nestlm.speculative import NEAR_TIE, DecodingError, SpecStats, SpeculativeDecoder
from tests.decoding_models import hybrid, llama, prompts, with_budgets

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parents[1] / "data" / "elastic-v1"
NEW = 23  # not a multiple of k + 1 for any k in {1, 2, 4, 8}


def assert_greedy_equal(model, ids, ref: torch.Tensor, out: torch.Tensor, budget) -> int:
    """ref == out, except after a first mismatch at a near-tie of plain decoding; returns the near-ties."""
    if torch.equal(ref, out):
        return 0
    ties = 0
    assert ref.shape[0] == out.shape[0]
    for b in range(ref.shape[0]):
        diff = (ref[b] != out[b]).nonzero()
        if len(diff) == 0:
            continue
        j = int(diff[0])
        logits = model(ref[b : b + 1, :j], budget=budget).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, f"row {b}: first mismatch at {j} is not a near-tie"
        ties += 1
    return ties


@pytest.fixture(scope="module")
def small_vocab():
    """Budgets close enough (full / 90 / 75, vocabulary 32) that distinct pairs accept some drafts."""
    m = hybrid(vocab=32, init_std=0.1)
    m.elastic.clear()
    return with_budgets(m, (("full", "1.0"), ("90", "0.9"), ("75", "0.75")))


ALL_K = (1, 2, 4, 8)
FAST = [("full", "90", (1, 4)), ("90", "full", (2, 8)), ("full", "full", (4,))]  # the default tier's share


@pytest.mark.slow
def test_greedy_equals_plain_for_every_pair_and_k(small_vocab) -> None:
    grid = [(t, d, ALL_K) for t, d in itertools.product(small_vocab.budgets, small_vocab.budgets)]
    check_greedy_grid(small_vocab, grid)


def test_greedy_equals_plain_fast(small_vocab) -> None:
    check_greedy_grid(small_vocab, FAST)


def check_greedy_grid(model, grid) -> None:
    ids = prompts(2, 12, seed=0, vocab=32)
    total, ties = SpecStats(), 0
    for t, d, ks in grid:
        ref = model.generate(ids, max_new_tokens=NEW, budget=t)
        for k in ks:
            st = SpecStats()
            out = model.generate(ids, max_new_tokens=NEW, budget=t, draft_budget=d, num_draft_tokens=k, stats=st)
            assert out.shape == ref.shape
            ties += assert_greedy_equal(model, ids, ref, out, t)
            assert st.rounds == st.rounds_none + st.rounds_some + st.rounds_all
            assert st.accepted + st.rejected == st.drafted == sum(st.accepted_per_row) + sum(st.rejected_per_row)
            if t == d:  # a draft equal to the target: every draft accepted
                assert st.rounds_all == st.rounds > 0 and st.rejected == 0
                # 22 tokens after the first, k + 1 per round, the last round shortened to what is left
                assert st.rounds + st.plain_steps == 2 * -(-(NEW - 1) // (k + 1))
            for name in ("rounds_none", "rounds_some", "rounds_all", "accepted", "rejected"):
                setattr(total, name, getattr(total, name) + getattr(st, name))
    print(f"near-ties {ties}; rounds none/some/all {total.rounds_none}/{total.rounds_some}/{total.rounds_all}")
    assert total.rounds_none > 0 and total.rounds_some > 0 and total.rounds_all > 0
    assert ties <= 2


@pytest.mark.slow
def test_elastic_checkpoint_every_pair() -> None:
    """The stored elastic checkpoint (full / 75 / 50), every (target, draft) pair and k."""
    model = nestlm.load(str(DATA)).eval()
    ids = prompts(2, 10, seed=4)
    for t, d in itertools.product(model.budgets, model.budgets):
        ref = model.generate(ids, max_new_tokens=NEW, budget=t, eos_token_id=[])
        for k in (1, 2, 4, 8):
            out = model.generate(ids, max_new_tokens=NEW, budget=t, draft_budget=d, num_draft_tokens=k, eos_token_id=[])
            assert_greedy_equal(model, ids, ref, out, t)


def test_eos_inside_an_accepted_block_and_padding() -> None:
    model = hybrid(init_std=0.25)
    ids = prompts(2, 12, seed=1)
    plain = model.generate(ids, max_new_tokens=NEW, budget="full", eos_token_id=[])
    # with draft == target, k = 4: token 0 comes from the prefill, then blocks of 5 (4 drafts + bonus)
    row = plain[0, 12:].tolist()
    pos = next(p for p in range(2, NEW) if row[p] not in row[:p] and row[p] not in plain[1, 12:].tolist())
    assert (pos - 1) % 5 != 4  # a draft position, not the bonus
    eos = row[pos]
    ref = model.generate(ids, max_new_tokens=NEW, budget="full", eos_token_id=eos, pad_token_id=0)
    st = SpecStats()
    out = model.generate(
        ids, max_new_tokens=NEW, budget="full", draft_budget="full", num_draft_tokens=4, eos_token_id=eos,
        pad_token_id=0, stats=st,
    )  # fmt: skip
    assert torch.equal(out, ref)
    assert out[0, 12 + pos] == eos and (out[0, 13 + pos :] == 0).all()  # padded after EOS
    assert st.rounds_all == st.rounds


def test_draft_arch_shallower_and_narrower() -> None:
    model = hybrid(init_std=0.25)
    ids = prompts(2, 12, seed=2)
    cfg = model.config
    ref = model.generate(ids, max_new_tokens=NEW, budget="full")
    for spec in (ArchSpec.full(cfg).replace(drop_layers=[3, 4, 5, 6, 7]), model.budget("50").arch.replace(mlp=32)):
        st = SpecStats()
        out = model.generate(ids, max_new_tokens=NEW, budget="full", draft_arch=spec, num_draft_tokens=3, stats=st)
        assert_greedy_equal(model, ids, ref, out, "full")
        assert st.draft_steps > 0


def _plain_cache(model, ids: torch.Tensor, tokens: list[int], arch) -> InferenceCache:
    """Plain decoding's cache after the prompt (prefill) and ``tokens`` fed one at a time."""
    c = InferenceCache(model.config.n_layers)
    model(ids, arch=arch, cache=c, num_logits=1)
    for t in tokens:
        model(torch.tensor([[t]]), arch=arch, cache=c, num_logits=1)
    return c


def _assert_states_equal(spec_cache: InferenceCache, plain: InferenceCache, row: int) -> int:
    """Row ``row`` of a speculative cache against a one-row plain cache: SSM, conv, the KV of kept slots."""
    checked = 0
    for a, b in zip(spec_cache.layers, plain.layers, strict=True):
        if isinstance(a, MambaState):
            torch.testing.assert_close(a.ssm[row], b.ssm[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(a.conv[row], b.conv[0], atol=1e-5, rtol=0)
            checked += 1
        elif isinstance(a, AttentionState):
            keep = torch.ones(a.length, dtype=torch.bool)
            if spec_cache.key_mask is not None:
                keep = spec_cache.key_mask[row]
            assert int(keep.sum()) == b.length
            torch.testing.assert_close(a.k[row, :, : a.length][:, keep], b.k[0, :, : b.length], atol=1e-5, rtol=0)
            torch.testing.assert_close(a.v[row, :, : a.length][:, keep], b.v[0, :, : b.length], atol=1e-5, rtol=0)
            checked += 1
    return checked


def wide_state():
    """small_vocab's budgets with a large SSM state: the verify forward takes ssd_steps' quadratic form."""
    m = hybrid(vocab=32, init_std=0.1, mamba_heads=8, mamba_head_dim=32, d_state=128)
    m.elastic.clear()
    return with_budgets(m, (("full", "1.0"), ("90", "0.9"), ("75", "0.75")))


@pytest.mark.parametrize("make", [hybrid, wide_state, llama], ids=["hybrid", "wide-state", "llama"])
def test_states_after_rejection_equal_plain_decoding(make, small_vocab) -> None:
    """After rounds with rejections, target and draft caches equal plain decoding of the kept tokens."""
    model = small_vocab if make is hybrid else make() if make is wide_state else make(init_std=0.1)
    vocab = model.config.vocab_size
    ids = prompts(2, 9, seed=5, vocab=vocab)
    target, draft = model.budget("full").arch, model.budget(model.budgets[1]).arch
    dec = SpeculativeDecoder(model, target, draft, k=4)
    logits = dec.prefill(ids, None, 64)
    cur = dec.first(logits)
    kept: list[list[int]] = [[int(cur[b])] for b in range(2)]
    rejected_rounds = 0
    for _ in range(6):
        drafts, n, _ = dec.round(cur, 4, torch.ones(2, dtype=torch.bool))
        for b in range(2):
            kept[b] += drafts[b, : int(n[b])].tolist() + [int(dec.next[b])]
        cur = dec.next
        rejected_rounds += int((n < 4).sum())
        if bool((n < 4).any()):
            for b in range(2):
                fed = kept[b][:-1]  # the pending token has not been fed yet
                assert _assert_states_equal(dec.tc, _plain_cache(model, ids[b : b + 1], fed, target), b) > 0
                assert _assert_states_equal(dec.dc, _plain_cache(model, ids[b : b + 1], fed, draft), b) > 0
    assert rejected_rounds > 0


def test_batched_rows_equal_their_solo_results() -> None:
    model = hybrid(vocab=32, init_std=0.1)
    lengths = [12, 7, 10]
    full = prompts(3, 12, seed=7, vocab=32)
    mask = torch.zeros(3, 12, dtype=torch.long)
    ids = torch.zeros(3, 12, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 12 - n :], mask[b, 12 - n :] = full[b, :n], 1
    st = SpecStats()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, budget="full", draft_budget="75", num_draft_tokens=3, stats=st
    )
    assert len(set(st.accepted_per_row)) > 1  # rows accepted different counts
    for b, n in enumerate(lengths):
        solo = model.generate(full[b : b + 1, :n], max_new_tokens=NEW, budget="full")
        spec = model.generate(full[b : b + 1, :n], max_new_tokens=NEW, budget="full", draft_budget="75")
        assert_greedy_equal(model, None, solo, spec, "full")
        assert_greedy_equal(model, None, solo[:, n:], out[b : b + 1, 12:], "full")


def test_per_row_caps_and_row_stop_give_each_rows_solo_run() -> None:
    """max_new_tokens as a list and row_stop: each row's tokens, and its accepted / rejected counts, are
    those of its solo run with its own cap (the server batches requests of different max_tokens)."""
    model = hybrid(vocab=32, init_std=0.1)
    lengths, caps = [12, 7, 10, 9], [NEW, 5, 14, 3]
    full = prompts(4, 12, seed=7, vocab=32)
    mask = torch.zeros(4, 12, dtype=torch.long)
    ids = torch.zeros(4, 12, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 12 - n :], mask[b, 12 - n :] = full[b, :n], 1
    kw = dict(budget="full", draft_budget="75", num_draft_tokens=3)
    solo = []
    for b, n in enumerate(lengths):
        st = SpecStats()
        out = model.generate(full[b : b + 1, :n], max_new_tokens=caps[b], stats=st, **kw)[0, n:].tolist()
        solo.append((out, st.accepted_per_row[0], st.rejected_per_row[0]))
    stop_at = 6  # row 2 stops after 6 tokens through row_stop, as its solo run with stop= does
    st_stop = SpecStats()
    stop = lambda new: torch.tensor([new.shape[1] >= stop_at])  # noqa: E731
    cut = model.generate(full[2:3, :10], max_new_tokens=caps[2], stats=st_stop, stop=stop, **kw)[0, 10:].tolist()
    seen: list[tuple[int, int]] = []
    st = SpecStats()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=caps,
        stats=st,
        on_token=lambda b, t, _lg: seen.append((b, t)),
        row_stop=lambda b, new: b == 2 and len(new) >= stop_at,
        **kw,
    )
    for b in range(4):
        want, acc, rej = (cut, st_stop.accepted_per_row[0], st_stop.rejected_per_row[0]) if b == 2 else solo[b]
        assert out[b, 12 : 12 + len(want)].tolist() == want, b
        assert (st.accepted_per_row[b], st.rejected_per_row[b]) == (acc, rej), b
        assert [t for r, t in seen if r == b] == want  # on_token saw exactly the row's tokens
    assert len(solo[3][0]) == 3 and solo[3][1] + solo[3][2] == 1  # a cap of 3: one token, one draft, one token


@pytest.mark.parametrize("grid", ["fast", pytest.param("all", marks=pytest.mark.slow)])
def test_transformer_parent(grid: str) -> None:
    model = llama(init_std=0.1)
    ids = prompts(2, 10, seed=3)
    pairs = itertools.product(model.budgets, model.budgets) if grid == "all" else [("full", "75"), ("50", "full")]
    for t, d in pairs:
        ref = model.generate(ids, max_new_tokens=NEW, budget=t)
        for k in ALL_K if grid == "all" else (3,):
            out = model.generate(ids, max_new_tokens=NEW, budget=t, draft_budget=d, num_draft_tokens=k)
            assert_greedy_equal(model, ids, ref, out, t)


def test_bad_arguments_are_clear_errors() -> None:
    model = hybrid()
    ids = prompts(1, 5, seed=0)
    cases = [
        (dict(draft_budget="50", draft_arch=model.budget("50").arch), "either draft_budget= or draft_arch="),
        (dict(draft_budget="50", num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
        (dict(num_draft_tokens=3), "needs a draft"),
        (dict(budget="full", budget_schedule=[{"budget": "50"}]), "not both"),
    ]
    for kw, msg in cases:
        with pytest.raises(DecodingError, match=msg):
            model.generate(ids, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'draft_budgett'"):
        model.generate(ids, draft_budgett="50")
    with pytest.raises(nestlm.errors.UnknownBudgetError, match="known budgets"):
        model.generate(ids, draft_budget="7b")


def test_hf_llama_parent(tmp_path: Path) -> None:
    """A Llama read from a Hugging Face directory (llama3 RoPE scaling), budgets added by hand."""
    from tests.transformer_models import LLAMA3, make_transformer

    model = with_budgets(nestlm.load(make_transformer(tmp_path / "llama", rope=LLAMA3)).eval())
    ids = prompts(2, 9, seed=6, vocab=model.config.vocab_size)
    for t, d in (("full", "50"), ("75", "full")):
        ref = model.generate(ids, max_new_tokens=NEW, budget=t, eos_token_id=[])
        out = model.generate(ids, max_new_tokens=NEW, budget=t, draft_budget=d, num_draft_tokens=4, eos_token_id=[])
        assert_greedy_equal(model, ids, ref, out, t)
