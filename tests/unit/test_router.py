"""Unit tests of elastic/router.py: exact costs, straight-through gates, schedules, freezing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nestlm import HybridLM, ModelConfig
from nestlm.elastic.arch import ArchSpec, Target, count_parameters
from nestlm.elastic.router import ElasticRouters, RouterSample, gumbel_schedule, resolve_choices

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(
    vocab_size=53,
    hidden_size=32,
    mamba_heads=8,
    mamba_head_dim=4,
    mamba_groups=2,
    d_state=8,
    attn_heads=8,
    kv_heads=4,
    attn_head_dim=8,
    ffn=48,
    mamba_chunk_size=8,
)
AXES = {
    "hidden": [1.0, 0.75, 0.5],
    "mamba_heads": [1.0, 0.5],
    "attn_heads": [1.0, 0.5],
    "mlp": [1.0, 0.5, 0.25],
    "depth": [0, 1, 2],
}
LAYER_ORDER = [4, 1, 6, 0, 3, 5, 2]


def _config(tie: bool = False) -> ModelConfig:
    return ModelConfig.from_pattern("M*-M-*M", tie_embeddings=tie, **CFG)


def _routers(cfg: ModelConfig, heterogeneous: bool = False, n_budgets: int = 2, seed: int = 0) -> ElasticRouters:
    torch.manual_seed(seed)
    order = LAYER_ORDER[: cfg.n_layers]
    return ElasticRouters(
        cfg, resolve_choices(cfg, AXES), n_budgets, layer_order=order, d_router=16, heterogeneous=heterogeneous
    )


def _one_hot(routers: ElasticRouters, choice: dict[str, list[int]]) -> RouterSample:
    probs, ch = {}, {}
    for axis, idx in choice.items():
        t = torch.tensor(idx)
        probs[axis] = F.one_hot(t, len(routers.choices[axis])).float()
        ch[axis] = t
    return RouterSample(probs, ch)


def _combos(routers: ElasticRouters, rows: dict[str, int]) -> list[dict[str, list[int]]]:
    axes = list(routers.choices)
    per_axis = [list(itertools.product(range(len(routers.choices[a])), repeat=rows[a])) for a in axes]
    return [{a: list(c) for a, c in zip(axes, combo, strict=True)} for combo in itertools.product(*per_axis)]


@pytest.mark.parametrize("tie", [False, True])
def test_expected_cost_of_one_hot_choices_is_the_exact_parameter_count(tie):
    cfg = _config(tie)
    routers = _routers(cfg)
    combos = _combos(routers, {a: 1 for a in routers.choices})
    assert len(combos) == 3 * 2 * 2 * 3 * 3
    model = HybridLM(cfg)
    for choice in combos:
        sample = _one_hot(routers, choice)
        spec = routers.arch(sample.choice)
        cost = routers.expected_cost(sample, Target("fraction", 0.5))
        assert int(round(float(cost))) == spec.num_parameters(cfg), choice
        # independently of the count's arithmetic: the parameters of the model actually sliced to the choice
        # (a tied head is one parameter, counted once)
        assert spec.num_parameters(cfg) == sum(p.numel() for p in model.slice(spec).parameters()), choice


def test_expected_cost_of_one_hot_choices_is_the_exact_memory():
    cfg = _config()
    routers = _routers(cfg)
    kw = dict(dtype=torch.bfloat16, batch=2, context=64)
    for choice in _combos(routers, {a: 1 for a in routers.choices})[::7]:
        sample = _one_hot(routers, choice)
        cost = routers.expected_cost(sample, Target("memory", 1e6), **kw)
        assert int(round(float(cost))) == routers.arch(sample.choice).memory_bytes(cfg, **kw), choice


def test_heterogeneous_expected_cost_is_exact_per_layer():
    cfg = _config()
    routers = _routers(cfg, heterogeneous=True)
    rows = {a: (len(routers.layers_of[a]) if a in routers.layers_of else 1) for a in routers.choices}
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        choice = {a: torch.randint(0, len(routers.choices[a]), (rows[a],), generator=gen).tolist() for a in rows}
        sample = _one_hot(routers, choice)
        spec = routers.arch(sample.choice)
        assert int(round(float(routers.expected_cost(sample, Target("params", 1e4))))) == spec.num_parameters(cfg)


def test_the_full_choice_costs_the_parent():
    cfg = _config()
    routers = _routers(cfg)
    sample = _one_hot(routers, {a: [0] for a in routers.choices})
    assert routers.arch(sample.choice) == ArchSpec.full(cfg)
    assert int(float(routers.expected_cost(sample, Target("fraction", 1.0)))) == count_parameters(cfg)


def test_hard_gates_are_one_in_value_and_carry_the_router_gradient():
    cfg = _config()
    routers = _routers(cfg)
    sample = routers.sample(0, tau=0.5, scale=2.0, generator=torch.Generator().manual_seed(1))
    gates = routers.hard_gates(sample)
    values = [gates["hidden"]] + [g for g in gates["layers"] if g is not None]
    assert len(values) == 1 + cfg.n_layers
    for g in values:
        assert g.item() == 1.0
    sum(values).backward()
    grads = [p.grad for p in routers.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_hard_tap_forward_equals_the_sliced_model():
    cfg = _config()
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    routers = _routers(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    sample = routers.sample(1, tau=0.5, scale=2.0, generator=torch.Generator().manual_seed(3))
    spec = routers.arch(sample.choice)
    with torch.no_grad():
        nested = model(ids, arch=spec, tap=routers.hard_tap(sample)).logits
        sliced = model.slice(spec)(ids).logits
    torch.testing.assert_close(nested, sliced, atol=1e-5, rtol=0)


def test_soft_masks_of_the_full_choice_leave_the_forward_unchanged():
    cfg = _config()
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    routers = _routers(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    sample = _one_hot(routers, {a: [0] for a in routers.choices})
    with torch.no_grad():
        torch.testing.assert_close(model(ids, tap=routers.soft_tap(sample)).logits, model(ids).logits)


def test_gumbel_schedule_endpoints():
    tau, scale = (1.0, 0.05), (1.0, 10.0)
    assert gumbel_schedule(0, 100, tau, scale) == (1.0, 1.0)
    t_end, s_end = gumbel_schedule(100, 100, tau, scale)
    assert t_end == pytest.approx(0.05, rel=1e-12) and s_end == pytest.approx(10.0, rel=1e-12)
    t_mid, s_mid = gumbel_schedule(50, 100, tau, scale)
    assert t_mid == pytest.approx(0.05**0.5) and s_mid == pytest.approx(5.5)  # geometric, linear
    assert gumbel_schedule(250, 100, tau, scale) == gumbel_schedule(100, 100, tau, scale)  # clamped after the end


@pytest.mark.parametrize("heterogeneous", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_freezing_lands_within_tolerance(heterogeneous, fraction):
    cfg = _config()
    routers = _routers(cfg, heterogeneous=heterogeneous, seed=3)
    target, tol = Target("fraction", fraction), 0.05
    goal = target.params(cfg)
    spec = routers.freeze(0, target, tol)
    within = abs(spec.num_parameters(cfg) / goal - 1) <= tol
    if not heterogeneous:  # every combination is scored: the grid has one within 5% of these targets
        assert within
        return
    # heterogeneous: single greedy steps from the argmax toward the target, stopping within the
    # tolerance or at the first step that crosses the target (the documented fallback)
    start_over = routers.freeze(0).num_parameters(cfg) > goal
    assert within or (spec.num_parameters(cfg) > goal) != start_over
    assert spec != routers.freeze(0)  # it did move toward the target


def test_freezing_without_a_target_is_the_argmax():
    cfg = _config()
    routers = _routers(cfg, seed=4)
    logits = routers.logits(1)
    argmax = {a: lg.argmax(dim=-1) for a, lg in logits.items()}
    assert routers.freeze(1) == routers.arch(argmax)


def test_freezing_an_unreachable_target_picks_the_closest_choice():
    """The documented fallback (homogeneous routers): every combination is scored, the closest one wins."""
    cfg = _config()
    routers = _routers(cfg, seed=5)
    spec = routers.freeze(0, Target("fraction", 0.01), 0.05)
    smallest = routers.arch({a: torch.tensor([len(v) - 1]) for a, v in routers.choices.items()})
    assert spec == smallest
    assert spec.num_parameters(cfg) == min(
        routers.arch(_one_hot(routers, c).choice).num_parameters(cfg)
        for c in _combos(routers, {a: 1 for a in routers.choices})
    )


def test_freezing_says_when_the_routers_own_choice_is_outside_the_tolerance():
    """A saturated router left outside the tolerance: freeze_budgets warns, naming both counts; inside, silence."""
    import warnings

    from nestlm.elastic.training import freeze_budgets
    from nestlm.train.recipe import ElasticSection

    cfg = _config()
    routers = _routers(cfg, seed=6)
    e = ElasticSection(budgets={"full": 1.0, "half": 0.5}, axes=AXES, tolerance=0.05)
    targets = {"full": Target("fraction", 1.0), "half": Target("fraction", 0.5)}
    with torch.no_grad():  # every axis's router prefers the full width: 100% of the parent, far from 50%
        for r in routers.routers.values():
            r.net[-1].bias.copy_(torch.tensor([50.0] + [0.0] * (r.net[-1].bias.numel() - 1)))
            r.net[-1].weight.zero_()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = freeze_budgets(cfg, ["full", "half"], targets, ["half"], routers, e, True)
    assert abs(out["half"].params / (0.5 * count_parameters(cfg)) - 1) <= 0.05
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "'half'" in msgs[0] and f"{count_parameters(cfg):,}" in msgs[0]
    assert f"{out['half'].params:,}" in msgs[0] and "outside the 5% tolerance" in msgs[0]
    # the record says so too, through elastic.json, so that a study counts the run as failed
    assert out["half"].own_choice is False and out["full"].own_choice is None
    from nestlm.checkpoint import Budget

    back = Budget.from_dict("half", out["half"].to_dict(), cfg)
    assert back.own_choice is False and back == out["half"]
    with warnings.catch_warnings(record=True) as w:  # a target the argmax meets: no warning
        warnings.simplefilter("always")
        ok = freeze_budgets(
            cfg, ["full", "half"], {**targets, "half": Target("fraction", 1.0)}, ["half"], routers, e, True
        )
    assert not w and ok["half"].own_choice is True


@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_warm_start_puts_the_routers_on_the_one_shot_choice(fraction):
    """elastic.router_init: one-shot: the routers' argmax is a grid choice within the tolerance, next to
    the homogeneous one-shot widths on every axis, held with probability >= 0.6 but not saturated."""
    from nestlm.elastic.arch import closest_homogeneous
    from nestlm.elastic.training import warm_start_routers
    from nestlm.train.recipe import ElasticSection

    cfg = _config()
    routers = _routers(cfg, seed=7)
    e = ElasticSection(budgets={"a": fraction, "b": 0.9}, axes=AXES, tolerance=0.05)
    targets = {"a": Target("fraction", fraction), "b": Target("fraction", 0.9)}
    before = {a: lg.detach().clone() for a, lg in routers.logits(0).items()}
    chosen = warm_start_routers(routers, cfg, targets, ["a", "b"], e)
    for j, name in enumerate(["a", "b"]):
        spec = chosen[name]
        assert routers.freeze(j) == spec  # the routers now prefer it
        assert abs(spec.num_parameters(cfg) / targets[name].params(cfg) - 1) <= 0.05
        one_shot = closest_homogeneous(cfg, targets[name], tolerance=0.05)
        grid = routers.choices["hidden"]
        near = sorted(grid, key=lambda v: abs(v - one_shot.hidden))[:2]  # within one grid step of pruning's width
        assert spec.hidden in near, (spec.hidden, one_shot.hidden)
        for a, lg in routers.logits(j).items():
            p = F.softmax(lg[0].detach(), dim=-1).max()
            assert 0.6 <= float(p) < 0.9, (name, a, float(p))
    assert any(not torch.equal(before[a], lg) for a, lg in routers.logits(0).items())
    with pytest.raises(Exception, match="homogeneous routers"):
        warm_start_routers(_routers(cfg, heterogeneous=True), cfg, targets, ["a", "b"], e)


def test_search_init_starts_the_routers_at_the_choice_of_least_one_shot_kd():
    """elastic.router_init: search: among the grid choices within the tolerance, the one whose sub-network of
    the untrained parent distils best (lowest KL to the parent on the batches); the same on every call."""
    from nestlm.elastic.training import search_router_init
    from nestlm.train.losses import kd_loss
    from nestlm.train.recipe import ElasticSection

    cfg = _config()
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, cfg.vocab_size, (2, 12), generator=g),) * 2 for _ in range(2)]
    batches = [(x, x.roll(-1, dims=1)) for x, _ in batches]
    e = ElasticSection(budgets={"a": 0.6, "b": 0.8}, axes=AXES, tolerance=0.05)
    targets = {"a": Target("fraction", 0.6), "b": Target("fraction", 0.8)}
    routers = _routers(cfg, seed=3)
    chosen = search_router_init(routers, model, batches, targets, ["a", "b"], e)
    again = search_router_init(_routers(cfg, seed=4), model, batches, targets, ["a", "b"], e)
    assert {k: v.to_dict() for k, v in chosen.items()} == {k: v.to_dict() for k, v in again.items()}
    with torch.no_grad():
        teacher = [model(x).logits for x, _ in batches]

    @torch.no_grad()
    def kd(arch: ArchSpec) -> float:
        return sum(
            float(kd_loss(model(x, arch=arch).logits, t, 1.0, y)) for (x, y), t in zip(batches, teacher, strict=True)
        )

    for j, name in enumerate(["a", "b"]):
        spec = chosen[name]
        assert abs(spec.num_parameters(cfg) / targets[name].params(cfg) - 1) <= 0.05
        inside = [
            routers.arch(ch)
            for ch in routers.grid()
            if abs(routers.arch(ch).num_parameters(cfg) / targets[name].params(cfg) - 1) <= 0.05
        ]
        assert len(inside) >= 2  # a real choice was made
        assert kd(spec) == pytest.approx(min(kd(a) for a in inside))
        assert kd(spec) < max(kd(a) for a in inside)
        assert routers.freeze(j) == spec  # the routers now prefer it, with p >= 0.6 but not saturated
        for lg in routers.logits(j).values():
            assert 0.6 <= float(F.softmax(lg[0].detach(), dim=-1).max()) < 0.9
