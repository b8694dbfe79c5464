"""Budget schedules give exactly what running their phases by hand gives.

By hand, with no schedule code: plain greedy ``generate`` at budget A, the output cut in the test
at the first token whose decoded text contains the stop string (or at ``max_tokens``, then the
force text's ids appended; or at an EOS), then plain greedy at budget B from the full context.
"""

from __future__ import annotations

import pytest
import torch

from nestlm.speculative import DecodingError
from nestlm.tokenizer import ByteTokenizer
from tests.decoding_models import hybrid, prompts

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ByteTokenizer()
TOTAL = 30


@pytest.fixture(scope="module")
def model():
    return hybrid(init_std=0.25)


def greedy(model, ctx: torch.Tensor, n: int, budget: str, **kw) -> list[int]:
    return model.generate(ctx, max_new_tokens=n, budget=budget, **kw)[0, ctx.shape[1] :].tolist()


def ascii_stop(gen: list[int]) -> tuple[str, int]:
    """A 2-character stop string the model does generate (printable ASCII), and where its text ends."""
    for j in range(3, len(gen) - 1):
        if all(35 <= t < 3 + 127 for t in gen[j : j + 2]):
            stop = TOK.decode(gen[j : j + 2])
            n = next(n for n in range(1, len(gen) + 1) if stop in TOK.decode(gen[:n]))  # first decoded stop
            return stop, n
    raise AssertionError("no printable pair in the greedy output")


def by_hand(model, ids, first: list[int], b: str, total: int, **kw) -> list[int]:
    ctx = torch.cat([ids, torch.tensor([first])], 1)
    return first + greedy(model, ctx, total - len(first), b, **kw)


def test_stop_ends_the_phase_after_the_token_that_completes_it(model) -> None:
    ids = prompts(1, 10, seed=1)
    gen_a = greedy(model, ids, TOTAL, "50")
    stop, n = ascii_stop(gen_a)
    expect = by_hand(model, ids, gen_a[:n], "full", TOTAL)
    sched = [{"budget": "50", "stop": [stop, "never generated \u2603"]}, {"budget": "full"}]
    out = model.generate(ids, max_new_tokens=TOTAL, budget_schedule=sched, tokenizer=TOK)
    assert out[0, 10:].tolist() == expect
    assert expect != greedy(model, ids, TOTAL, "50") and expect != greedy(model, ids, TOTAL, "full")  # teeth


def test_max_tokens_then_force(model) -> None:
    ids = prompts(1, 10, seed=2)
    first = greedy(model, ids, 6, "50") + TOK.encode("Answer:")
    expect = by_hand(model, ids, first, "full", TOTAL)
    sched = [{"budget": "50", "stop": "\u2603", "max_tokens": 6, "force": "Answer:"}, {"budget": "full"}]
    out = model.generate(ids, max_new_tokens=TOTAL, budget_schedule=sched, tokenizer=TOK)
    assert out[0, 10:].tolist() == expect
    # a phase that stops before max_tokens appends no force text
    gen_a = greedy(model, ids, TOTAL, "50")
    stop, n = ascii_stop(gen_a)
    sched[0] |= {"stop": stop, "max_tokens": n + 2}
    out = model.generate(ids, max_new_tokens=TOTAL, budget_schedule=sched, tokenizer=TOK)
    assert out[0, 10:].tolist() == by_hand(model, ids, gen_a[:n], "full", TOTAL)


def test_max_new_tokens_caps_all_phases_forced_tokens_included(model) -> None:
    ids = prompts(1, 10, seed=2)
    sched = [{"budget": "50", "max_tokens": 6, "force": "Answer:"}, {"budget": "full"}]
    out = model.generate(ids, max_new_tokens=8, budget_schedule=sched, tokenizer=TOK)
    assert out[0, 10:].tolist() == greedy(model, ids, 6, "50") + TOK.encode("An")


def test_eos_ends_a_non_final_phase(model) -> None:
    ids = prompts(1, 10, seed=3)
    gen_a = greedy(model, ids, TOTAL, "50")
    p = next(p for p in range(3, TOTAL) if gen_a[p] not in gen_a[:p])
    eos = gen_a[p]
    first = greedy(model, ids, TOTAL, "50", eos_token_id=eos)
    assert first == gen_a[: p + 1]  # plain generate stopped at the EOS
    expect = by_hand(model, ids, first, "full", TOTAL, eos_token_id=eos)
    sched = [{"budget": "50", "max_tokens": 25}, {"budget": "full"}]
    out = model.generate(ids, max_new_tokens=TOTAL, budget_schedule=sched, eos_token_id=eos, tokenizer=TOK)
    got = out[0, 10:].tolist()
    assert got[: len(expect)] == expect and all(t == 0 for t in got[len(expect) :])  # pad id 0 after a final EOS


def test_thinking_budget_and_the_requests_stop(model) -> None:
    """NVIDIA's budget control: the full model thinks for at most 5 tokens, then '</think>' is forced."""
    ids = prompts(1, 10, seed=4)
    first = greedy(model, ids, 5, "full") + TOK.encode("</think>")
    rest = greedy(model, torch.cat([ids, torch.tensor([first])], 1), 20, "full")
    stop_at = 7  # the request's own stop: a callable seeing the whole completion
    sched = [{"budget": "full", "stop": "</think>", "max_tokens": 5, "force": "</think>"}, {"budget": "full"}]

    def stop(new: torch.Tensor) -> torch.Tensor:
        return torch.tensor([new.shape[1] >= len(first) + stop_at])

    out = model.generate(ids, max_new_tokens=TOTAL, budget_schedule=sched, tokenizer=TOK, stop=stop)
    assert out[0, 10:].tolist() == first + rest[:stop_at]


def test_batch_rows_equal_their_solo_schedules(model) -> None:
    full = prompts(2, 10, seed=5)
    ids = full.clone()
    ids[1, :4] = 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    sched = [{"budget": "50", "max_tokens": 4, "force": "=>"}, {"budget": "75"}]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, budget_schedule=sched, tokenizer=TOK)
    for b, prompt in enumerate([full[0:1], full[1:2, 4:]]):
        solo = model.generate(prompt, max_new_tokens=12, budget_schedule=sched, tokenizer=TOK)
        assert out[b, 10:].tolist() == solo[0, prompt.shape[1] :].tolist()
        first = greedy(model, prompt, 4, "50") + TOK.encode("=>")
        assert out[b, 10:].tolist() == by_hand(model, prompt, first, "75", 12)


def test_per_row_caps_row_stop_and_streamed_tokens(model) -> None:
    """max_new_tokens as a list (one cap per row) and row_stop: each row equals its solo schedule with
    its own cap (and stop=); on_token sees each row's tokens as they come, phase by phase."""
    full = prompts(3, 10, seed=5)
    ids, mask = full.clone(), torch.ones_like(full)
    ids[1, :4], mask[1, :4] = 0, 0
    rows = [full[0:1], full[1:2, 4:], full[2:3]]
    sched = [{"budget": "50", "max_tokens": 4, "force": "=>"}, {"budget": "75"}]
    caps = [12, 5, 9]
    kw = dict(budget_schedule=sched, tokenizer=TOK)
    pairs = zip(rows, caps, strict=True)
    solo = [model.generate(r, max_new_tokens=n, **kw)[0, r.shape[1] :].tolist() for r, n in pairs]
    stop = lambda new: torch.tensor([new.shape[1] >= 7])  # noqa: E731  (the last phase's 1st token)
    solo[2] = model.generate(rows[2], max_new_tokens=caps[2], stop=stop, **kw)[0, 10:].tolist()
    assert len(solo[2]) == 7 and len(solo[1]) == 5
    seen: list[tuple[int, int, str]] = []
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=caps,
        on_token=lambda b, t, _lg, name: seen.append((b, t, name)),
        row_stop=lambda b, new: b == 2 and len(new) >= 7,
        **kw,
    )
    for b in range(3):
        assert out[b, 10 : 10 + len(solo[b])].tolist() == solo[b], b
        assert [t for r, t, _ in seen if r == b] == solo[b]
        names = [n for r, _, n in seen if r == b]
        assert names[:6] == (["50"] * 4 + ["force"] * 2)[: len(names)] and set(names[6:]) <= {"75"}
    with pytest.raises(DecodingError, match="one per row"):
        model.generate(ids, attention_mask=mask, max_new_tokens=[3, 4], **kw)
    with pytest.raises(DecodingError, match="need budget_schedule= or draft_budget="):  # plain decoding: stop=
        model.generate(ids, attention_mask=mask, budget="50", row_stop=lambda b, new: False)


@pytest.mark.parametrize(
    "sched, msg",
    [
        ([], "non-empty list"),
        ([{"budget": "50", "stopp": "x"}], "unknown key 'stopp'"),
        ([{"budget": "7b"}], "'7b' is unknown; known budgets: full, 75, 50"),
        ([{"budget": "50", "force": "x"}], "force needs max_tokens"),
        ([{"budget": "50", "max_tokens": 0}], "max_tokens must be an integer >= 1"),
        ([{"budget": "50", "stop": ""}], "stop must be a non-empty string"),
    ],
)
def test_bad_schedules(model, sched, msg) -> None:
    with pytest.raises(DecodingError, match=msg):
        model.generate(prompts(1, 4, seed=0), budget_schedule=sched, tokenizer=TOK)


def test_budget_and_schedule_together_is_an_error(model) -> None:
    with pytest.raises(DecodingError, match="not both"):
        model.generate(prompts(1, 4, seed=0), budget="full", budget_schedule=[{"budget": "50"}])
