"""Speculative decoding with a nested budget (or any ArchSpec) of the same weights as the draft.

Each round the draft proposes k tokens one step at a time; the target verifies them in ONE
forward of k + 1 tokens (the pending token and the k drafts); the accepted prefix and the
target's next token are kept. Greedy output is the target's own greedy output; sampling uses
the standard rule (:func:`accept_reject`), so the output distribution is the target's. Logit bias
and penalties shape the draft's and the target's logits alike, each position with the tokens
before it (the drafts before it included), before both are warped the same way.

Rollback is exact, per row. A verify forward runs with ``InferenceCache.keep_steps``: every Mamba
layer keeps its conv state after each of the k + 1 tokens and its SSM states as an
``ssd_steps.SSMSteps`` (the one-token recurrence's states, or for large states the inputs that
give any one of them), and a row that accepted n drafts takes the state after token n.
The draft's single steps are kept the same way. The KV cache keeps one length for all rows:
slots a row rejected are masked out of its key mask (later tokens never see them, and rotary
positions count real tokens only), and slots every row rejected are cut off the end. With
one row nothing is masked: the caches are truncated to exactly what plain decoding holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .cache import AttentionState, InferenceCache, MambaState
from .errors import DecodingError
from .sampling import LogitShaper, Shaping, kv_capacity, resolve_generator, special_ids, warped_probs
from .ssd_steps import SSMSteps

if TYPE_CHECKING:
    from .elastic.arch import ArchSpec
    from .model import HybridLM

NEAR_TIE = 1e-4  # a verify forward and step-by-step decoding differ by ~3e-6 in the logits


@dataclass
class SpecStats:
    """What a speculative decoder did. A round counts once per row that was still generating."""

    rounds: int = 0  # (row, round) pairs with at least one draft token
    rounds_none: int = 0  # ... where no draft was accepted
    rounds_some: int = 0  # ... where some but not all were
    rounds_all: int = 0  # ... where every draft was accepted
    plain_steps: int = 0  # (row, round) pairs with no draft (one token left to generate)
    drafted: int = 0
    accepted: int = 0  # draft tokens the target accepted
    rejected: int = 0  # draft tokens it did not
    near_ties: int = 0  # greedy: kept target positions whose top-2 logit margin is below NEAR_TIE
    draft_steps: int = 0  # draft forwards (each one token for every row)
    verify_steps: int = 0  # target forwards after the prefill
    accepted_per_row: list[int] = field(default_factory=list)  # accepted drafts that reached the output
    rejected_per_row: list[int] = field(default_factory=list)

    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def accept_reject(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative sampling rule on WARPED distributions.

    p: (B, k + 1, V) target probabilities at the k + 1 verify positions; q: (B, k, V) the draft's
    probabilities the drafts (B, k) were sampled from. Draft j is accepted with probability
    min(1, p_j(d) / q_j(d)); at the first rejection the next token is drawn from the normalised
    residual max(0, p_j - q_j); when all k are accepted, the bonus token is drawn from p_k.
    Returns (accepted counts (B,), next tokens (B,)).
    """
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (B, k)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=p.device)
    ok = u * qd < pd  # u < p / q; q > 0 where the draft was sampled
    n = ok.long().cumprod(1).sum(1)  # accepted prefix length
    rows = torch.arange(B, device=p.device)
    pn = p[rows, n]  # (B, V)
    qn = torch.cat([q, torch.zeros_like(p[:, :1])], 1)[rows, n]  # q = 0 at the bonus position: residual = p
    res = (pn - qn).clamp(min=0)
    mass = res.sum(-1, keepdim=True)
    res = torch.where(mass > 0, res / mass.clamp(min=1e-30), pn)  # p == q exactly: nothing to correct
    return n, torch.multinomial(res, 1, generator=generator).squeeze(-1)


def per_row_caps(max_new_tokens: int | list[int], B: int) -> list[int]:
    """``max_new_tokens`` as one cap per row: an int for every row, or a list of B ints."""
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * B
    caps = list(max_new_tokens)
    if len(caps) != B or not all(isinstance(c, int) and not isinstance(c, bool) for c in caps):
        raise DecodingError(f"max_new_tokens must be an integer or a list of {B} integers (one per row)")
    return caps


def _mamba_now(cache: InferenceCache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: (st.conv, st.ssm) for i, st in enumerate(cache.layers) if isinstance(st, MambaState)}


def keep_tokens(
    cache: InferenceCache,
    keep: torch.Tensor,
    added: int,
    steps: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Roll ``cache`` back so that row b holds only the first keep[b] of the ``added`` tokens of the
    last forward(s). Mamba states come from ``steps`` (layer -> (conv (B, added, C, K-1), ssm an
    SSMSteps of ``added`` states)) or, where absent, from MambaState.steps of a keep_steps forward."""
    B = keep.shape[0]
    rows = torch.arange(B, device=keep.device)
    for i, st in enumerate(cache.layers):
        if isinstance(st, MambaState):
            conv, ssm = steps[i] if steps is not None else st.steps
            st.conv, st.ssm, st.steps = conv[rows, keep - 1].contiguous(), ssm.at(keep - 1).contiguous(), None
    cut = added - int(keep.max())  # slots no row keeps: truncate
    holes = bool((keep < keep.max()).any())
    if holes:  # slots some rows keep and others not: masked out of the rejecting rows' keys
        if cache.key_mask is None:
            cache.key_mask = torch.ones(B, cache.offset, dtype=torch.bool, device=keep.device)
        new = torch.arange(added, device=keep.device)[None] < keep[:, None]  # (B, added)
        cache.key_mask[:, cache.offset - added :] &= new
    if cut:
        for st in cache.layers:
            if isinstance(st, AttentionState):
                st.length -= cut
        cache.offset -= cut
        if cache.key_mask is not None:
            cache.key_mask = cache.key_mask[:, : cache.offset]


class SpeculativeDecoder:
    """Target and draft caches of one batch, and the rounds that extend them; see the module docstring."""

    def __init__(
        self,
        model: HybridLM,
        target: ArchSpec | None,
        draft: ArchSpec | None,
        k: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        min_p: float | None = None,
    ) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise DecodingError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
        self.model, self.target, self.draft, self.k = model, target, draft, k
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.min_p, self.gen = min_p, generator
        self.shaper: LogitShaper | None = None  # logit bias and penalties, counting the output so far
        self.per_row = isinstance(generator, list)  # one generator per row: each row draws what it would alone
        self.stats = SpecStats()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1])
        return warped_probs(flat, self.temperature, self.top_k, self.top_p, self.min_p).view(shape)

    def shaped(self, logits: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) shaped as the next token after the output so far and ``drafts`` (B, j); or
        (B, m, V), position j after drafts[:, :j]."""
        if self.shaper is None:
            return logits
        if logits.dim() == 2:
            return self.shaper(logits, drafts)
        return torch.stack([self.shaper(logits[:, j], drafts[:, :j]) for j in range(logits.shape[1])], 1)

    def _choose(self, logits: torch.Tensor, draw: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (B,), their warped distribution (B, V) or None when greedy) from logits (B, V).
        With one generator per row, only rows with ``draw[b]`` (all when None) draw, each from its
        own generator as its solo run would; the others get the argmax (a token nobody keeps)."""
        if not self.do_sample:
            return logits.argmax(-1), None
        q = self._probs(logits)
        if not self.per_row:
            return torch.multinomial(q, 1, generator=self.gen).squeeze(-1), q
        tok = logits.argmax(-1)
        for b, g in enumerate(self.gen):
            if draw is None or draw[b]:
                tok[b] = torch.multinomial(q[b : b + 1], 1, generator=g)[0, 0]
        return tok, q

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, capacity: int) -> torch.Tensor:
        """Prefill both caches; returns the target's logits (B, V) for the first new token."""
        n_layers = self.model.config.n_layers
        self.tc = InferenceCache(n_layers, capacity=capacity)
        self.dc = InferenceCache(n_layers, capacity=capacity)
        mask = attention_mask
        out = self.model(input_ids, arch=self.target, cache=self.tc, attention_mask=mask, num_logits=1)
        self.model(input_ids, arch=self.draft, cache=self.dc, attention_mask=mask, num_logits=1)
        self.tc.keep_steps = True
        self.unread = input_ids.new_zeros(input_ids.shape[0], 0)
        return out.logits[:, -1]

    def first(self, logits: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """The first new token of each row, from the prefill's target logits (per-row generators:
        rows not ``live`` draw nothing)."""
        tok, _ = self._choose(logits, None if live is None else live.tolist())
        if not self.do_sample:
            self._ties(logits[:, None], torch.zeros(len(tok), dtype=torch.long, device=tok.device))
        return tok

    def _ties(self, logits: torch.Tensor, n: torch.Tensor, live: torch.Tensor | None = None) -> None:
        top2 = logits.topk(2, dim=-1).values  # (B, m, 2)
        close = (top2[..., 0] - top2[..., 1]) < NEAR_TIE  # (B, m)
        used = torch.arange(logits.shape[1], device=n.device)[None] <= n[:, None]
        if live is not None:
            used &= live[:, None]
        self.stats.near_ties += int((close & used).sum())

    def _roll_draft(self, keep: torch.Tensor, d_states: list[dict]) -> None:
        stack = lambda i, j: torch.stack([s[i][j] for s in d_states], 1)  # noqa: E731  (B, len(d_states), ...)
        steps = {i: (stack(i, 0), SSMSteps(states=stack(i, 1))) for i in d_states[0]}
        keep_tokens(self.dc, keep, len(d_states), steps)

    def accept(self, target_logits: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sampling: (accepted counts, next tokens) from the target's logits (B, k + 1, V) and the
        warped draft distributions q (B, k, V) the drafts (B, k) were drawn from."""
        return accept_reject(self._probs(target_logits), q, drafts, self.gen)

    def accept_rows(
        self, tl: torch.Tensor, q: list[torch.Tensor], drafts: torch.Tensor, live: list[bool], kbs: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling with one generator per row: (accepted counts, next tokens), row b deciding on its
        own first kbs[b] drafts with its own generator, exactly as its solo round of kbs[b] drafts
        does (rows not ``live`` draw nothing)."""
        p = self._probs(tl)  # (B, kk + 1, V)
        n, nxt = torch.zeros(len(live), dtype=torch.long, device=tl.device), tl[:, 0].argmax(-1)
        for b, g in enumerate(self.gen):
            kb = kbs[b]
            if not live[b]:
                continue
            if kb == 0:  # no draft: the solo round samples the target's first position (as _choose)
                nxt[b] = torch.multinomial(p[b, :1], 1, generator=g)[0, 0]
                continue
            qb = torch.stack([x[b : b + 1] for x in q[:kb]], 1)  # (1, kb, V)
            nb, xb = accept_reject(p[b : b + 1, : kb + 1], qb, drafts[b : b + 1, :kb], g)
            n[b], nxt[b] = nb[0], xb[0]
        return n, nxt

    def round(
        self, cur: torch.Tensor, kk: int, live: torch.Tensor, kbs: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round from the pending tokens ``cur`` (B,) with ``kk`` drafts.

        Returns (drafts (B, kk), accepted counts n (B,), the target's logits (B, kk + 1, V)); row b's
        new tokens are drafts[b, :n[b]] followed by the target's token, ``self.next[b]``. With one
        generator per row, row b samples and judges only its first ``kbs[b]`` drafts (what its own
        cap leaves it; kk when None), so its draws are those of its solo run.
        """
        model, st = self.model, self.stats
        live_l = live.tolist()
        kbs = [kk] * len(cur) if kbs is None else kbs
        d_toks, d_probs, d_states, d_logits = [], [], [], []
        m = self.unread.shape[1]  # tokens before cur the draft has not read yet (all rows alike)
        x = cur
        for j in range(kk):
            inp = torch.cat([self.unread, x[:, None]], 1) if j == 0 else x[:, None]
            self.dc.keep_steps = j == 0 and m > 0
            out = model(inp, arch=self.draft, cache=self.dc, num_logits=1)
            if self.dc.keep_steps:  # the states after each unread token, then after cur
                lay = {i: st_.steps for i, st_ in enumerate(self.dc.layers) if isinstance(st_, MambaState)}
                d_states += [{i: (c[:, t], h.at(t)) for i, (c, h) in lay.items()} for t in range(m)]
                self.dc.keep_steps = False
            d_states.append(_mamba_now(self.dc))
            d_logits.append(out.logits[:, -1])
            lg = self.shaped(out.logits[:, -1], torch.stack(d_toks, 1) if d_toks else None)
            x, q = self._choose(lg, [lv and j < kb for lv, kb in zip(live_l, kbs, strict=True)])
            d_toks.append(x)
            d_probs.append(q)
        st.draft_steps += kk
        drafts = torch.stack(d_toks, 1) if kk else cur.new_zeros(len(cur), 0)
        v_in = torch.cat([cur[:, None], drafts], 1)  # (B, kk + 1)
        tl = model(v_in, arch=self.target, cache=self.tc).logits  # (B, kk + 1, V)
        ts = self.shaped(tl, drafts)  # what the target chooses from (tl: its own logits, for logprobs)
        st.verify_steps += 1
        if self.do_sample and self.per_row:
            if kk:
                self.draft_logits = torch.stack(d_logits, 1)
            n, nxt = self.accept_rows(ts, d_probs, drafts, live_l, kbs)
        elif self.do_sample and kk:
            self.draft_logits = torch.stack(d_logits, 1)  # (B, kk, V) unwarped, for diagnostics
            n, nxt = self.accept(ts, torch.stack(d_probs, 1), drafts)
        elif self.do_sample:
            n, nxt = torch.zeros_like(cur), self._choose(ts[:, 0])[0]
        else:
            g = ts.argmax(-1)  # (B, kk + 1)
            n = (drafts == g[:, :kk]).long().cumprod(1).sum(1)
            nxt = g.gather(1, n[:, None]).squeeze(1)
            self._ties(ts, n, live)
        keep_tokens(self.tc, n + 1, kk + 1)
        if kk == 0:  # no draft ran: cur joins the unread tokens
            self.unread = torch.cat([self.unread, cur[:, None]], 1)
        elif bool((n == kk).all()):  # every row keeps the last draft: the next round's first draft step reads it
            self._roll_draft(m + n, d_states)
            self.unread = drafts[:, -1:]
        else:
            if bool((n == kk).any()):  # the draft has not yet read the last token some rows keep
                model(v_in[:, -1:], arch=self.draft, cache=self.dc, num_logits=1)
                d_states.append(_mamba_now(self.dc))
                st.draft_steps += 1
            self._roll_draft(m + n + 1, d_states)
            self.unread = self.unread[:, :0]
        self.next = nxt
        return drafts, n, tl


@torch.inference_mode()
def speculative_generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    budget: str | None = None,
    arch: ArchSpec | None = None,
    draft_budget: str | None = None,
    draft_arch: ArchSpec | None = None,
    num_draft_tokens: int = 4,
    max_new_tokens: int | list[int] = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stats: SpecStats | None = None,
    on_token: Callable[[int, int, torch.Tensor], None] | None = None,
    row_stop: Callable[[int, list[int]], bool] | None = None,
    on_done: Callable[[int], None] | None = None,
    min_p: float | None = None,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """``generate`` at the target (``budget`` / ``arch``) with ``draft_budget`` / ``draft_arch`` as the draft.

    Returns what ``generate`` returns: (B, L + new), rows padded with ``pad_token_id`` after EOS.
    ``stop`` is called per row with that row's new tokens (1, n); ``row_stop(row, new tokens)``
    the same with the row's index. ``max_new_tokens`` may be a list, one cap per row: a row then
    drafts at most what its own cap leaves (as it would alone), so its tokens and its counts in
    ``stats.accepted_per_row`` / ``rejected_per_row`` are those of its solo run. ``stats``, when
    given, is filled in (a :class:`SpecStats`). ``on_token(row, token, target_logits (V,))`` sees
    every output token as it is produced; ``on_done(row)`` is called once a row has its last token
    (its counts in ``stats`` are final then). ``generator`` may be a list, one per row: row b then
    draws from its own, in the order and shapes of its solo run, so a sampled row's tokens equal
    its solo run with that generator (up to float noise of the batched forward). ``min_p``,
    ``logit_bias`` and the penalties as in ``generate`` (nestlm.sampling.Shaping).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if draft_budget is not None and draft_arch is not None:
        raise DecodingError("give either draft_budget= or draft_arch=, not both")
    if draft_budget is None and draft_arch is None:
        raise DecodingError("speculative decoding needs draft_budget= or draft_arch=")
    target = model.resolve_arch(arch, budget)
    draft = model.resolve_arch(draft_arch, draft_budget)
    if do_sample and temperature <= 0:
        raise DecodingError(f"temperature must be > 0 when sampling, got {temperature}")
    gen = resolve_generator(generator, seed, input_ids.shape[0], input_ids.device)
    eos_ids, pad = special_ids(model, eos_token_id, pad_token_id, input_ids.device)
    eos = set(eos_ids.tolist())
    k = num_draft_tokens
    shaping = Shaping.of(logit_bias, presence_penalty, frequency_penalty, repetition_penalty)
    dec = SpeculativeDecoder(model, target, draft, k, do_sample, temperature, top_k, top_p, gen, min_p)
    if stats is not None:
        dec.stats = stats
    st = dec.stats
    B, L = input_ids.shape
    caps = per_row_caps(max_new_tokens, B)
    st.accepted_per_row, st.rejected_per_row = [0] * B, [0] * B
    out: list[list[int]] = [[] for _ in range(B)]
    live = torch.tensor([c > 0 for c in caps], dtype=torch.bool)
    if max(caps) <= 0:
        return input_ids

    def ends(b: int, tok: int) -> bool:
        if tok in eos or len(out[b]) >= caps[b]:
            return True
        if row_stop is not None and row_stop(b, out[b]):
            return True
        return stop is not None and bool(stop(torch.tensor([out[b]], device=input_ids.device))[0])

    def emit(b: int, tok: int, logits: torch.Tensor) -> bool:
        """Append one token to row b; True when the row is done (and on_done has been told)."""
        out[b].append(tok)
        if dec.shaper is not None:
            dec.shaper.add_row(b, [tok])
        if on_token is not None:
            on_token(b, tok, logits)
        done = ends(b, tok)
        if done and on_done is not None:
            on_done(b)
        return done

    logits = dec.prefill(input_ids, attention_mask, kv_capacity(L, max(caps)) + k + 2)
    if shaping is not None:
        dec.shaper = LogitShaper.of_batch(shaping, input_ids, attention_mask, None, logits.shape[-1])
    cur = dec.first(dec.shaped(logits), live)
    for b in range(B):
        if live[b] and emit(b, int(cur[b]), logits[b]):
            live[b] = False
    while bool(live.any()):
        left = max(caps[b] - len(out[b]) for b in range(B) if live[b])
        kk = min(k, left - 1)
        # the drafts each row would run alone: no more than its own cap leaves room for
        kbs = [min(kk, caps[b] - len(out[b]) - 1) for b in range(B)]
        drafts, n, tl = dec.round(cur, kk, live.to(cur.device), kbs)
        nxt = dec.next
        dl, nl, xl = drafts.tolist(), n.tolist(), nxt.tolist()
        for b in range(B):
            if not live[b]:
                continue
            kb = kbs[b]
            nb = min(nl[b], kb)
            if kb == 0:
                st.plain_steps += 1
            else:
                st.rounds += 1
                st.rounds_none += nb == 0
                st.rounds_all += nb == kb
                st.rounds_some += 0 < nb < kb
                st.drafted += kb
                st.accepted += nb
                st.rejected += kb - nb
                st.rejected_per_row[b] += kb - nb
            # past its own drafts the row takes the target's token there: the accepted draft
            # (greedy: the target's argmax) when it accepted more; the row ends with it
            toks = dl[b][:nb] + [xl[b] if nb == nl[b] else dl[b][nb]]
            for j, tok in enumerate(toks):
                if j < nb:
                    st.accepted_per_row[b] += 1
                if emit(b, tok, tl[b, j]):
                    live[b] = False
                    break
        cur = nxt
    width = max(len(o) for o in out)
    new = torch.full((B, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, o in enumerate(out):
        new[b, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], 1)
