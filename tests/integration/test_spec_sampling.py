"""Speculative sampling keeps the target's distribution: a chi-square goodness-of-fit test.

On a vocabulary of 4 tokens, with a draft whose next-token distribution is far from the
target's (total variation >= 0.2), temperature 0.7 and top-p 0.8, the first k + 2 = 4 tokens
of N sampled continuations are counted over the 4^4 sequences and tested against the target's
exact joint distribution (enumerated with uncached forwards: the product of its warped
next-token probabilities). Cells with an expected count below 5 are pooled. The test passes at
p > 1e-3 (Pearson's statistic, p-value from the Wilson-Hilferty approximation of the chi-square
tail, accurate to a few percent at these degrees of freedom). A sample outside the target's
support (a token top-p removed) fails at once.

The threshold has teeth: each of three broken rules fails it with p < 1e-6 at the same N
(residual taken from p, acceptance ratio on unwarped distributions, bonus token from q), and so
do plain sampling at temperature 1 without top-p. N = 3000 rows run as one batch, so rows accept
different counts in every round (the masked-KV path). Measured (``-m slow -s``): speculative
p = 0.044, plain p = 0.13; residual from p p = 1e-102, unwarped ratio and bonus from q p = 0 (they
sample sequences outside the target's top-p support).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from nestlm.sampling import warp_logits
from nestlm.speculative import SpecStats, SpeculativeDecoder, accept_reject
from tests.decoding_models import hybrid

pytestmark = pytest.mark.usefixtures("one_thread")
K, TEMP, TOP_P, N, V = 2, 0.7, 0.8, 3000, 4
PROMPT = torch.tensor([[1, 3, 0, 2, 2, 1]])


@pytest.fixture(scope="module")
def tiny():
    shape = dict(hidden_size=24, mamba_head_dim=6, attn_head_dim=6, ffn=32, pattern="M*-M", mamba_chunk_size=4)
    return hybrid(vocab=V, init_std=0.3, **shape)


@torch.no_grad()
def exact_joint(model, budget: str, temp: float = TEMP, top_p: float | None = TOP_P) -> dict[tuple, float]:
    seqs = torch.tensor(list(itertools.product(range(V), repeat=K + 2)))  # (V^4, 4)
    ids = torch.cat([PROMPT.expand(len(seqs), -1), seqs], 1)
    L = PROMPT.shape[1]
    logits = model(ids, budget=budget).logits[:, L - 1 : L + K + 1]  # (S, 4, V): the logits of tokens 1..4
    probs = warp_logits(logits.reshape(-1, V), temp, None, top_p).softmax(-1).view(len(seqs), K + 2, V)
    p = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return {tuple(s): float(q) for s, q in zip(seqs.tolist(), p, strict=True)}


def chi2_pvalue(samples: torch.Tensor, expected: dict[tuple, float]) -> float:
    n = samples.shape[0]
    counts: dict[tuple, int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    if any(expected.get(c, 0.0) == 0.0 for c in counts):
        return 0.0  # a sequence the target cannot produce
    stat, df, pool_e, pool_o = 0.0, -1, 0.0, 0
    for cell, p in expected.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        df += 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))  # Wilson-Hilferty
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample(model, speculative: bool, seed: int, **kw) -> torch.Tensor:
    ids = PROMPT.expand(N, -1)
    args = dict(max_new_tokens=K + 2, do_sample=True, temperature=TEMP, top_p=TOP_P, seed=seed, eos_token_id=[])
    args |= kw
    if speculative:
        args |= dict(draft_budget="50", num_draft_tokens=K)
    return model.generate(ids, budget="full", **args)[:, PROMPT.shape[1] :]


@torch.no_grad()
def test_draft_and_target_differ(tiny) -> None:
    L = PROMPT.shape[1]
    for temp, top_p in ((1.0, None), (TEMP, TOP_P)):
        p = warp_logits(tiny(PROMPT, budget="full").logits[:, L - 1], temp, None, top_p).softmax(-1)
        q = warp_logits(tiny(PROMPT, budget="50").logits[:, L - 1], temp, None, top_p).softmax(-1)
        assert 0.5 * float((p - q).abs().sum()) >= 0.2


def test_speculative_and_plain_sampling_match_the_target(tiny) -> None:
    exact = exact_joint(tiny, "full")
    st = SpecStats()
    spec = sample(tiny, True, seed=1, stats=st)
    assert st.rounds_none > 0 and st.rounds_some > 0 and st.rounds_all > 0
    p_spec, p_plain = chi2_pvalue(spec, exact), chi2_pvalue(sample(tiny, False, seed=2), exact)
    print(f"p-values: speculative {p_spec:.3g}, plain {p_plain:.3g}")
    assert p_spec > 1e-3 and p_plain > 1e-3
    # the plain sampler's own distribution differs measurably without the warping
    assert chi2_pvalue(sample(tiny, False, seed=3, temperature=1.0, top_p=None), exact) < 1e-6


def _residual_from_p(self, target_logits, q, drafts):
    p = self._probs(target_logits)
    n, _ = accept_reject(p, q, drafts, self.gen)
    rows = torch.arange(len(n))
    return n, torch.multinomial(p[rows, n], 1, generator=self.gen).squeeze(-1)


def _unwarped_ratio(self, target_logits, q, drafts):
    """Acceptance from softmax of the raw logits; residual and bonus from the warped ones."""
    p, k = self._probs(target_logits), drafts.shape[1]
    p_raw, q_raw = target_logits.softmax(-1), self.draft_logits.softmax(-1)
    pd = p_raw[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q_raw.gather(-1, drafts[..., None]).squeeze(-1)
    ok = torch.rand(drafts.shape, generator=self.gen) * qd < pd
    n = ok.long().cumprod(1).sum(1)
    rows = torch.arange(len(n))
    res = (p[rows, n] - torch.cat([q, torch.zeros_like(p[:, :1])], 1)[rows, n]).clamp(min=0)
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, p[rows, n])
    return n, torch.multinomial(res / res.sum(-1, keepdim=True), 1, generator=self.gen).squeeze(-1)


def _bonus_from_q(self, target_logits, q, drafts):
    n, nxt = accept_reject(self._probs(target_logits), q, drafts, self.gen)
    dc = copy.deepcopy(self.dc)  # the draft's distribution after the last draft token
    q_bonus = self._probs(self.model(drafts[:, -1:], arch=self.draft, cache=dc, num_logits=1).logits[:, -1])
    from_q = torch.multinomial(q_bonus, 1, generator=self.gen).squeeze(-1)
    return n, torch.where(n == drafts.shape[1], from_q, nxt)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [_residual_from_p, _unwarped_ratio, _bonus_from_q])
def test_each_broken_rule_fails_the_test(tiny, broken, monkeypatch) -> None:
    exact = exact_joint(tiny, "full")
    monkeypatch.setattr(SpeculativeDecoder, "accept", broken)
    p = chi2_pvalue(sample(tiny, True, seed=1), exact)
    print(f"{broken.__name__}: p = {p:.3g}")
    assert p < 1e-6
