"""Several budgets in one generation: budget schedules, and the entry point that picks the decoder.

A budget schedule is a list of phases, e.g. think small, answer big::

    [{"budget": "50", "stop": "Answer:", "max_tokens": 256, "force": "Answer:"}, {"budget": "full"}]

Each phase generates at its budget until one of its ``stop`` strings (a string or a list) has
been generated (the stop text stays in the context; the phase ends after the token that
completes it), or until ``max_tokens`` tokens of that phase, in which case its ``force`` text
(if given, tokenized alone) is appended as tokens. An EOS in a non-final phase ends that phase
(the EOS stays in the context). The next phase continues from the whole context at its own
budget, its caches built by one prefill of the context so far: each phase is exactly a plain
``generate`` call at its budget on the context the phases before it left. The last phase runs
to the request's own stop conditions (EOS, ``stop``, which sees the whole completion); the
request's ``max_new_tokens`` (an int, or a list of one cap per row) caps all phases together,
forced tokens included. Rows of a batch run together, each phase one left-padded batch (a row
generates what it would alone). Sampling and shaping arguments (temperature, top_k, top_p, min_p,
logit_bias, the penalties) apply to every phase; the penalties count the whole completion so far,
earlier phases and forced tokens included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .sampling import resolve_generator, special_ids
from .speculative import DecodingError, SpecStats, per_row_caps, speculative_generate
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from .model import HybridLM

PHASE_KEYS = ("budget", "stop", "max_tokens", "force")


@dataclass
class Phase:
    """One validated phase of a budget schedule."""

    budget: str
    stop: list[str]
    max_tokens: int | None
    force: str | None


def parse_schedule(model: HybridLM, schedule: Any) -> list[Phase]:
    """Validate a schedule (a list of phase dicts); every error names the phase and the field."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise DecodingError("budget_schedule must be a non-empty list of phases ({'budget': NAME, ...})")
    phases = []
    for i, ph in enumerate(schedule):
        where = f"budget_schedule[{i}]"
        if not isinstance(ph, dict):
            raise DecodingError(f"{where} must be an object with 'budget' and optional {', '.join(PHASE_KEYS[1:])}")
        bad = sorted(set(ph) - set(PHASE_KEYS))
        if bad:
            raise DecodingError(f"{where} has unknown key {bad[0]!r}; valid keys: {', '.join(PHASE_KEYS)}")
        name = ph.get("budget")
        if not isinstance(name, str):
            raise DecodingError(f"{where}.budget must be a budget name; known budgets: {', '.join(model.budgets)}")
        if name not in model.budgets:
            raise DecodingError(f"{where}.budget {name!r} is unknown; known budgets: {', '.join(model.budgets)}")
        stop = ph.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise DecodingError(f"{where}.stop must be a non-empty string or a list of them")
        mt = ph.get("max_tokens")
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            raise DecodingError(f"{where}.max_tokens must be an integer >= 1, got {mt!r}")
        force = ph.get("force")
        if force is not None and (not isinstance(force, str) or not force):
            raise DecodingError(f"{where}.force must be a non-empty string")
        if force is not None and mt is None:
            raise DecodingError(f"{where}.force needs max_tokens (the text is forced when the phase reaches it)")
        phases.append(Phase(name, stop, mt, force))
    return phases


def _phase(
    model: HybridLM,
    ctxs: list[list[int]],
    news: list[list[int]],
    ph: Phase,
    last: bool,
    totals: list[int],
    eos: set[int],
    tok: Any,
    stop: Callable[[torch.Tensor], torch.Tensor] | None,
    row_stop: Callable[[int, list[int]], bool] | None,
    on_token: Callable[[int, int, torch.Tensor | None, str], None] | None,
    on_done: Callable[[int], None],
    rows: list[int],
    kwargs: dict[str, Any],
) -> None:
    """Run one phase for ``rows`` (one left-padded plain ``generate`` at the phase's budget), cut each
    row where its phase ended, append force ids, and extend ``ctxs`` / ``news`` in place. Each
    token goes to ``on_token`` as its step produces it (the forced ones after the phase); a row
    whose generation ended (the last phase's end, or the total cap) goes to ``on_done`` then."""
    left = [totals[b] - len(news[b]) for b in rows]
    caps = [n if ph.max_tokens is None else min(ph.max_tokens, n) for n in left]
    L = max(len(ctxs[b]) for b in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long, device=kwargs["device"])
    mask = torch.zeros_like(ids)
    for j, b in enumerate(rows):
        ids[j, L - len(ctxs[b]) :] = torch.tensor(ctxs[b])
        mask[j, L - len(ctxs[b]) :] = 1
    done_at: list[int | None] = [None] * len(rows)  # the step whose token ended the row's phase
    gens = kwargs["generator"]  # one, or one per row of the whole batch

    def stop_fn(gen: torch.Tensor) -> torch.Tensor:
        n = gen.shape[1]
        for j, b in enumerate(rows):
            if done_at[j] is None:
                g = gen[j].tolist()
                hit = n >= caps[j] or g[-1] in eos or (bool(ph.stop) and any(s in tok.decode(g) for s in ph.stop))
                if last and stop is not None and not hit:
                    hit = bool(stop(torch.tensor([news[b] + g], device=gen.device))[0])
                if last and row_stop is not None and not hit:
                    hit = row_stop(b, news[b] + g)
                if hit:
                    done_at[j] = n
                    if last or len(news[b]) + n >= totals[b]:
                        on_done(b)
        return torch.tensor([d is not None for d in done_at])

    def on_step(logits: torch.Tensor, toks: torch.Tensor) -> None:
        # called before stop_fn of the same step: a row whose phase has not ended yet owns this token
        for j, t in enumerate(toks.tolist()):
            if done_at[j] is None:
                on_token(rows[j], t, logits[j], ph.budget)

    out = model.generate(
        ids,
        attention_mask=mask if len(rows) > 1 else None,
        max_new_tokens=max(caps),
        budget=ph.budget,
        stop=stop_fn,
        on_step=on_step if on_token is not None else None,
        generator=[gens[b] for b in rows] if isinstance(gens, list) else gens,
        completion_start=[len(ctxs[b]) - len(news[b]) for b in rows],  # penalties count every phase's tokens
        **{k: v for k, v in kwargs.items() if k not in ("device", "generator", "completion_start")},
    )
    for j, b in enumerate(rows):
        g = out[j, L:].tolist()
        cut = done_at[j] if done_at[j] is not None else len(g)
        hit_eos = next((i + 1 for i, t in enumerate(g[:cut]) if t in eos), None)
        got = g[: hit_eos or cut]
        news[b] += got
        ctxs[b] += got
        if last or hit_eos:
            continue  # an EOS ends a non-final phase (and stays in the context)
        stopped = bool(ph.stop) and any(s in tok.decode(got) for s in ph.stop)
        if not stopped and ph.force is not None and len(got) == ph.max_tokens:
            forced = list(tok.encode(ph.force))[: totals[b] - len(news[b])]
            for t in forced:
                if on_token is not None:
                    on_token(b, t, None, "force")
            news[b] += forced
            ctxs[b] += forced
            if forced and len(news[b]) >= totals[b]:
                on_done(b)


@torch.inference_mode()
def schedule_generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    budget_schedule: Any,
    max_new_tokens: int | list[int] = 32,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    on_token: Callable[[int, int, torch.Tensor | None, str], None] | None = None,
    row_stop: Callable[[int, list[int]], bool] | None = None,
    on_done: Callable[[int], None] | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """Generation under a budget schedule (see the module docstring); returns (B, L + new) as ``generate``.

    ``tokenizer`` (encode / decode) reads stop strings and encodes force texts; by default the
    model directory's. ``stop`` is called per row with that row's whole completion (1, n) in the
    last phase; ``row_stop(row, completion)`` the same with the row's index.
    ``on_token(row, token, logits (V,) or None for a forced token, budget or "force")`` sees every
    new token as it is produced, phase by phase; ``on_done(row)`` is called once, as soon as a
    row has its last token. ``generator`` may be a list, one per row, each row drawing from its own
    over all its phases as it would alone with that generator.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    phases = parse_schedule(model, budget_schedule)
    tok = tokenizer
    if tok is None and any(ph.stop or ph.force for ph in phases):
        tok = load_tokenizer(getattr(model, "source_dir", None), required=False)
        if tok is None:
            raise DecodingError("a budget schedule with stop or force text needs a tokenizer (tokenizer=)")
    eos_ids, pad = special_ids(model, eos_token_id, pad_token_id, input_ids.device)
    eos = set(eos_ids.tolist())
    gen = resolve_generator(generator, seed, input_ids.shape[0], input_ids.device)
    kwargs = dict(sampling, eos_token_id=eos_ids.tolist(), pad_token_id=pad, generator=gen, device=input_ids.device)
    B = input_ids.shape[0]
    totals = per_row_caps(max_new_tokens, B)
    ctxs = [
        (input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]).tolist() for b in range(B)
    ]
    news: list[list[int]] = [[] for _ in range(B)]
    going = list(range(B))  # rows that neither hit the total cap nor ended in an EOS of the last phase
    told: set[int] = set()

    def done(b: int) -> None:
        if b not in told:
            told.add(b)
            if on_done is not None:
                on_done(b)

    for i, ph in enumerate(phases):
        going = [b for b in going if len(news[b]) < totals[b]]
        if not going:
            break
        last = i == len(phases) - 1
        _phase(model, ctxs, news, ph, last, totals, eos, tok, stop, row_stop, on_token, done, going, kwargs)
    width = max(len(r) for r in news)
    new = torch.full((B, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(news):
        new[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], 1)


def generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    budget_schedule: Any = None,
    draft_budget: str | None = None,
    draft_arch: Any = None,
    num_draft_tokens: int | None = None,
    tokenizer: Any = None,
    stats: SpecStats | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``model.generate``: plain decoding, a budget schedule, or speculative decoding.

    ``budget_schedule``: phases at different budgets (module docstring); not with ``budget=``.
    ``draft_budget`` / ``draft_arch`` with ``num_draft_tokens`` (default 4): speculative decoding
    at the target ``budget`` / ``arch`` (nestlm.speculative); ``stats`` a SpecStats to fill in.
    These two also take ``max_new_tokens`` as a list (one cap per row), ``row_stop(row, tokens)``
    (``stop`` with the row's index), ``on_token`` and ``on_done(row)``; plain decoding does not
    (its hook is ``on_step``). All three take ``generator=`` a list, one per row.
    """
    if budget_schedule is not None:
        if kwargs.get("budget") is not None or kwargs.get("arch") is not None:
            raise DecodingError("give either budget= (or arch=) or budget_schedule=, not both")
        if draft_budget is not None or draft_arch is not None or num_draft_tokens is not None:
            raise DecodingError("budget_schedule= does not combine with speculative decoding (draft_budget=)")
        kwargs.pop("budget", None)
        kwargs.pop("arch", None)
        return schedule_generate(model, input_ids, budget_schedule, tokenizer=tokenizer, **kwargs)
    if draft_budget is not None or draft_arch is not None:
        k = 4 if num_draft_tokens is None else num_draft_tokens
        draft = dict(draft_budget=draft_budget, draft_arch=draft_arch, num_draft_tokens=k, stats=stats)
        return speculative_generate(model, input_ids, **draft, **kwargs)
    if num_draft_tokens is not None:
        raise DecodingError("num_draft_tokens= needs a draft: draft_budget= or draft_arch=")
    hooks = [k for k in ("row_stop", "on_token", "on_done") if kwargs.get(k) is not None]
    if hooks or not isinstance(kwargs.get("max_new_tokens", 32), int):  # (plain decoding has on_step=)
        what = "=, ".join(hooks) + "= and " if hooks else ""
        raise DecodingError(f"{what}per-row max_new_tokens need budget_schedule= or draft_budget=")
    return model.generate(input_ids, **kwargs)  # plain decoding
