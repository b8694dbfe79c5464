"""MoE budgets: targets in total and active parameters, routers over the expert axes (exact costs,
soft masks that act on expert selection), the one-shot search and freezing that meet both counts."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import nestlm
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchError, ArchSpec, Target, closest_homogeneous, parse_target, target_error
from nestlm.elastic.router import ElasticRouters, RouterSample, resolve_choices
from tests.moe_models import SHAPES, make_moe
from tests.unit.test_moe_counts import nano_config
from tests.unit.test_router import CFG

pytestmark = pytest.mark.usefixtures("one_thread")

MOE_AXES = {
    "hidden": [1.0, 0.75],
    "moe_experts": [1.0, 0.6, 0.4],
    "moe_ffn": [1.0, 0.5],
    "moe_shared_ffn": [1.0, 0.5],
}


def test_parse_active_targets() -> None:
    assert parse_target("active=2e9") == Target("active", 2e9)
    assert parse_target("23e9,active=2.8e9") == Target("params", 23e9, 2.8e9)
    assert parse_target("0.75, active=0.5") == Target("fraction", 0.75, 0.5)
    assert parse_target("6e9") == Target("params", 6e9) and parse_target(0.5) == Target("fraction", 0.5)
    for bad in ("active=", "23e9,24e9", "active=1.5", "size=3", "active=2e9,active=3e9", "active=-1"):
        with pytest.raises(ArchError, match="budget target"):
            parse_target(bad)
    cfg = nano_config()
    goals = dict(parse_target("0.75,active=0.5").goals(cfg))
    full = ArchSpec.full(cfg)
    assert goals == {"params": 0.75 * full.num_parameters(cfg), "active": 0.5 * full.active_parameters(cfg)}
    assert "active parameters" in str(parse_target("23e9,active=2.8e9"))


@pytest.mark.parametrize("text", ["23e9,active=2.8e9", "12e9,active=2.0e9"])
def test_one_shot_search_meets_total_and_active(text: str) -> None:
    """Star Elastic's two budgets of Nemotron 3 Nano: fewer experts cut the total, narrower ones both."""
    cfg = nano_config()
    target = parse_target(text)
    spec = closest_homogeneous(cfg, target, tolerance=0.02)
    total, active = (float(v) for v in text.replace("active=", "").split(","))
    assert abs(spec.num_parameters(cfg) / total - 1) <= 0.02
    assert abs(spec.active_parameters(cfg) / active - 1) <= 0.02
    assert target_error(cfg, spec.to_config(cfg), target) <= 0.02
    moe = [ls for ls in spec.layers if ls is not None and ls.kind == "moe"]
    assert moe and all(ls.experts < 128 for ls in moe)  # only fewer experts reach both counts
    with pytest.raises(ArchError, match="cannot be reached"):  # a total below the active count
        closest_homogeneous(cfg, parse_target("3e9,active=3.5e9"))


def _moe_cfg() -> ModelConfig:
    return ModelConfig.from_pattern(
        "M*E-E", experts=10, expert_ffn=12, shared_ffn=10, moe_top_k=2, moe_n_group=2, moe_topk_group=1, **CFG
    )


def test_router_costs_over_expert_axes_are_exact() -> None:
    cfg = _moe_cfg()
    torch.manual_seed(0)
    axes = {**MOE_AXES, "mlp": [1.0, 0.5]}
    routers = ElasticRouters(cfg, resolve_choices(cfg, axes), 2, d_router=16)
    assert routers.choices["moe_experts"] == [10, 6, 4]
    kw = dict(dtype=torch.bfloat16, batch=2, context=64)
    for combo in itertools.product(*(range(len(v)) for v in routers.choices.values())):
        ch = {a: torch.tensor([c]) for a, c in zip(routers.choices, combo, strict=True)}
        sample = RouterSample({a: F.one_hot(c, len(routers.choices[a])).float() for a, c in ch.items()}, ch)
        spec = routers.arch(ch)
        t = Target("params", 1e4, 1e3)
        assert round(float(routers.expected_cost(sample, t))) == spec.num_parameters(cfg)
        assert round(float(routers.expected_cost(sample, t, what="active"))) == spec.active_parameters(cfg)
        mem = round(float(routers.expected_cost(sample, Target("memory", 1e6), **kw)))
        assert mem == spec.memory_bytes(cfg, **kw)
    # a budget naming both counts is penalised for each goal it misses
    ch = {a: torch.tensor([0]) for a in routers.choices}
    sample = RouterSample({a: F.one_hot(c, len(routers.choices[a])).float() for a, c in ch.items()}, ch)
    full = ArchSpec.full(cfg)
    both = Target("params", full.num_parameters(cfg), 0.5 * full.active_parameters(cfg))
    only_total = Target("params", full.num_parameters(cfg))
    assert float(routers.budget_loss(sample, only_total, 0.0)[0]) == 0.0
    assert float(routers.budget_loss(sample, both, 0.0)[0]) == pytest.approx(1.0)


def test_bad_expert_choices_are_refused() -> None:
    cfg = _moe_cfg()  # 2 groups: a kept count must split into 2 groups of >= 2, and hold top-2 in one group
    with pytest.raises(ArchError, match="moe_experts choice"):
        resolve_choices(cfg, {"moe_experts": [1.0, 2]})
    with pytest.raises(ArchError, match="not a multiple of the 2 expert groups"):
        resolve_choices(cfg, {"moe_experts": [1.0, 5]})


@pytest.mark.parametrize("shape", ["g2-top1group-k2-nonorm-odd", "g1-k1-nonorm-bias"])
def test_one_hot_soft_masks_on_experts_equal_the_sliced_moe(shape: str, tmp_path) -> None:
    """At a one-hot router output the soft-masked full-width forward (experts masked on selection,
    expert and shared neurons masked) is the sliced sub-network (1e-5), on routing that decides."""
    parent = nestlm.load(make_moe(tmp_path / "hf", seed=3, **SHAPES[shape])).eval()
    cfg = parent.config
    axes = dict(MOE_AXES)
    if any(ls.kind == "mlp" for ls in cfg.layers):
        axes["mlp"] = [1.0, 0.5]
    routers = ElasticRouters(cfg, resolve_choices(cfg, axes), 2, d_router=16)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    worst, moved = 0.0, 0
    with torch.no_grad():
        full = parent(x).logits
        combos = list(itertools.product(*(range(len(v)) for v in routers.choices.values())))
        for combo in combos:
            ch = {a: torch.tensor([c]) for a, c in zip(routers.choices, combo, strict=True)}
            sample = RouterSample({a: F.one_hot(c, len(routers.choices[a])).float() for a, c in ch.items()}, ch)
            spec = routers.arch(ch)
            soft = parent(x, tap=routers.soft_tap(sample)).logits
            sliced = parent.slice(spec)(x).logits
            worst = max(worst, float((soft - sliced).abs().max()))
            moved += float((sliced - full).abs().max()) > 1e-3
    assert worst <= 1e-5, worst
    assert moved == len(combos) - 1  # every combination but the all-full one is another function


def test_expert_mask_acts_on_selection(tmp_path) -> None:
    """A soft expert mask of 0 means never chosen: the routed experts all lie in the kept prefix of each group."""
    from nestlm.model import route

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 8, generator=g), torch.randn(10, 8, generator=g) * 3
    bias = torch.randn(10, generator=g) * 0.1
    mask = torch.tensor([1.0, 0.7, 0.2, 0.0, 0.0] * 2)  # per group of 5: the first 3 may be chosen
    index, weight = route(x, w, bias, 2, 2, 1, False, 1.0, mask)
    assert bool((index % 5 < 3).all())
    plain_index, plain_weight = route(x, w, bias, 2, 2, 1, False, 1.0)
    assert bool((plain_index % 5 >= 3).any())  # without the mask some tokens pick the masked experts
    scores = torch.sigmoid(x @ w.t())
    assert torch.allclose(weight, scores.gather(1, index) * mask[index])
