"""The serving scheduler without HTTP: continuous batching equals solo generate; auto's latency choice."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.checkpoint import Budget
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec, closest_homogeneous, parse_target
from nestlm.serve.scheduler import LatencyTracker, QueueFull, Request, Scheduler

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def elastic_model(rope: bool = True, eos: int | None = 2) -> nestlm.HybridLM:
    """A random byte-vocabulary hybrid (Mamba, attention, MLP) with budgets full / 75 / 50 built by hand."""
    cfg = ModelConfig.from_pattern(
        "M*-M-*",
        vocab_size=259,
        hidden_size=64,
        mamba_heads=4,
        mamba_head_dim=16,
        mamba_groups=2,
        d_state=16,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=16,
        ffn=128,
        mamba_chunk_size=16,
        rope_theta=1e4 if rope else None,
        eos_token_id=eos,
        pad_token_id=0,
        init_std=0.1,  # peaked logits: greedy choices are not near-ties
    )
    model = nestlm.HybridLM(cfg).eval()
    model.reset_parameters(seed=0)
    total = ArchSpec.full(cfg).num_parameters(cfg)
    for name, target in (("full", "1.0"), ("75", "0.75"), ("50", "0.5")):
        spec = ArchSpec.full(cfg) if name == "full" else closest_homogeneous(cfg, parse_target(target))
        n = spec.num_parameters(cfg)
        model.elastic[name] = Budget(name=name, target=target, arch=spec, params=n, fraction=n / total)
    return model


def write_model_dir(model: nestlm.HybridLM, path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """``model`` as a nestlm directory with the byte tokenizer (and a chat template in tokenizer_config.json)."""
    model.save_pretrained(str(path))
    (path / "nestlm_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    if chat_template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template, "eos_token": "</s>"}))
    return path


def solo(model: nestlm.HybridLM, prompt: list[int], budget: str | None, max_tokens: int, eos: int | None = 2):
    """What model.generate gives for this prompt alone, cut at EOS (the server does not return EOS)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, budget=budget)[0, len(prompt) :].tolist()
    return out[: out.index(eos)] if eos is not None and eos in out else out


def run_until_done(sched: Scheduler, events: list[list[tuple]], joins: dict[int, list[Request]] | None = None) -> None:
    step = 0
    while True:
        for r in (joins or {}).pop(step, []):
            sched.submit(r)
        if not joins and all(ev and ev[-1][0] in ("done", "error") for ev in events):
            return
        sched.step()
        step += 1
        assert step < 10_000


@pytest.fixture(scope="module")
def model(one_thread) -> nestlm.HybridLM:
    return elastic_model()


@pytest.mark.parametrize("rope", [True, False])
def test_staggered_joins_equal_solo_generate(rope: bool, one_thread) -> None:
    """Requests of every budget join a running batch at different steps, with different context lengths."""
    model = elastic_model(rope=rope)
    sched = Scheduler(model, max_batch=8)  # fewer slots than requests: some wait in the queue
    rng = random.Random(1)
    reqs, events, joins = [], [], {}
    for i in range(18):
        ev: list[tuple] = []
        r = Request(
            prompt=[rng.randint(3, 258) for _ in range(rng.randint(1, 40))],
            budget=model.budgets[i % 3],
            max_tokens=rng.randint(1, 24),
            sink=ev.append,
        )
        reqs.append(r)
        events.append(ev)
        joins.setdefault(rng.randint(0, 20), []).append(r)
    run_until_done(sched, events, joins)
    for r, ev in zip(reqs, events, strict=True):
        got = [e[1] for e in ev if e[0] == "token"]
        assert got == solo(model, r.prompt, r.budget, r.max_tokens), (r.budget, len(r.prompt))
        assert ev[-1][0] == "done" and ev[-1][1] in ("stop", "length")
    c = sched.counters
    assert c.prefills == 18 and c.finished == 18
    assert c.multi_row_steps > 0 and c.max_rows <= 8
    assert set(c.steps_per_budget) == {"full", "75", "50"}
    assert sched.active() == 0


def test_cancel_frees_the_row(model) -> None:
    sched = Scheduler(model)
    evs: list[list[tuple]] = [[], []]
    a = Request(prompt=[5, 6, 7], budget="full", max_tokens=200, sink=evs[0].append)
    b = Request(prompt=[8, 9], budget="full", max_tokens=10, sink=evs[1].append)
    sched.submit(a)
    sched.submit(b)
    sched.step()
    assert sched.active() == 2
    a.cancel()
    sched.step()
    assert sched.active() == 1 and evs[0][-1] == ("done", "cancelled")
    run_until_done(sched, [evs[1]])
    assert [e[1] for e in evs[1] if e[0] == "token"] == solo(model, [8, 9], "full", 10)


def test_bounded_queue(model) -> None:
    sched = Scheduler(model, max_queue=2)
    for _ in range(2):
        sched.submit(Request(prompt=[5], budget="50", max_tokens=1, sink=lambda e: None))
    with pytest.raises(QueueFull):
        sched.submit(Request(prompt=[5], budget="50", max_tokens=1, sink=lambda e: None))


def test_sampling_with_seed_equals_generate(model) -> None:
    sched = Scheduler(model)
    evs: list[list[tuple]] = [[], []]
    prompt = [40, 50, 60, 70]
    # a greedy neighbour in the same batch must not change the sampled row
    sched.submit(Request(prompt=prompt, budget="75", max_tokens=12, sink=evs[0].append, temperature=0.8, seed=7))
    sched.submit(Request(prompt=[9] * 5, budget="75", max_tokens=12, sink=evs[1].append))
    run_until_done(sched, evs)
    ref = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, budget="75", do_sample=True, temperature=0.8, seed=7
    )[0, 4:].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    assert [e[1] for e in evs[0] if e[0] == "token"] == ref


def test_echo_logprobs_equal_forward(model) -> None:
    sched = Scheduler(model)
    ev: list[tuple] = []
    prompt = [10, 20, 30, 40, 50]
    sched.submit(Request(prompt=prompt, budget="50", max_tokens=1, sink=ev.append, logprobs=2, echo_logprobs=True))
    run_until_done(sched, [ev])
    (plp,) = [e[1] for e in ev if e[0] == "prompt_logprobs"]
    (tok,) = [e for e in ev if e[0] == "token"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt]), budget="50").logits[0], -1)
    assert plp[0] is None and len(plp) == len(prompt)
    for j in range(1, len(prompt)):
        assert abs(plp[j]["logprob"] - float(lp[j - 1, prompt[j]])) < 1e-5
        assert plp[j]["top"][0][0] == int(lp[j - 1].argmax())
    assert tok[1] == int(lp[-1].argmax()) and abs(tok[2]["logprob"] - float(lp[-1].max())) < 1e-5


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_auto_steps_down_under_load_and_back_up_when_idle() -> None:
    sizes = {"full": 1000, "75": 750, "50": 500}
    clock = FakeClock()
    tr = LatencyTracker(sizes, target_ms=100, window_s=2.0, clock=clock)
    assert tr.choose() == "full"  # idle: nothing measured, the largest answers
    for _ in range(5):
        tr.record("full", 0.160)  # full under load: 160 ms per token
    # 75 is estimated from full: 160 * 750 / 1000 = 120 > 100; 50: 80 <= 100
    assert tr.estimate_ms("75") == pytest.approx(120) and tr.choose() == "50"
    clock.t += 2.5  # full's samples age out; 50 is measured itself and the others are scaled from it
    tr.record("50", 0.060)
    assert tr.estimate_ms("full") == pytest.approx(120) and tr.estimate_ms("75") == pytest.approx(90)
    assert tr.choose() == "75"
    tr.record("full", 0.500)
    for _ in range(20):
        tr.record("75", 0.300)  # heavy load everywhere: the smallest that meets the target
    assert tr.choose() == "50"
    tr.record("50", 0.400)
    assert tr.choose() == "50"  # nothing meets it: the smallest
    clock.t += 2.5  # load gone: samples age out of the window
    assert tr.recent_ms("full") is None and tr.choose() == "full"


@pytest.mark.parametrize("rope", [True, False])
def test_joined_cache_decode_equals_uncached_forward(rope: bool, one_thread) -> None:
    """Rows of different lengths joined into one cache, decoded together, one row dropped and the
    padding trimmed: each row's logits equal the uncached forward of its whole sequence."""
    from nestlm.cache import InferenceCache
    from nestlm.serve.scheduler import _row_caches_join, _trim_left

    model = elastic_model(rope=rope)
    spec = model.budget("75").arch
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (23, 5, 14)]
    cache = None
    with torch.no_grad():
        for s in seqs:
            c = InferenceCache(model.config.n_layers, capacity=len(s) + 8)
            model(torch.tensor([s]), arch=spec, cache=c, num_logits=1)
            cache = c if cache is None else _row_caches_join(cache, c)
        assert cache.offset == 23 and cache.key_mask.sum(1).tolist() == [23, 5, 14]
        for step in range(6):
            if step == 3:  # the longest row leaves: its padding columns go
                cache.reorder(torch.tensor([1, 2]))
                _trim_left(cache)
                seqs = seqs[1:]
                assert cache.offset == max(len(s) for s in seqs)
            nxt = torch.randint(3, 259, (len(seqs),), generator=g)
            for s, t in zip(seqs, nxt.tolist(), strict=True):
                s.append(t)
            got = model(nxt[:, None], arch=spec, cache=cache, num_logits=1).logits[:, -1]
            for i, s in enumerate(seqs):
                want = model(torch.tensor([s]), arch=spec).logits[0, -1]
                assert (got[i] - want).abs().max().item() <= 1e-5, (step, i)


def test_auto_scales_by_the_load_a_request_joins() -> None:
    """A spike steps down before its latency is measured: estimates scale with rows decoding."""
    clock = FakeClock()
    tr = LatencyTracker({"full": 1000, "75": 750, "50": 500}, target_ms=100, window_s=2.0, clock=clock)
    tr.record("full", 0.060, rows=1)  # 60 ms per token with one row decoding
    assert tr.choose(load=1) == "full"
    # 2 rows: full 120 ms, 75 (scaled from full by size) 90 ms
    assert tr.estimate_ms("full", load=2) == pytest.approx(120) and tr.choose(load=2) == "75"
    assert tr.choose(load=3) == "50"  # 75: 135, 50: 90
    tr.record("full", 0.300, rows=8)  # measured under 8 rows; mean: 180 ms at 4.5 rows
    assert tr.estimate_ms("full", load=1) == pytest.approx(40)  # the load has gone: full again
    assert tr.choose(load=1) == "full" and tr.choose(load=16) == "50"
