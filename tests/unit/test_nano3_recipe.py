"""recipes/nemotron-3-nano-30b-a3b-elastic.yaml checked on the meta device against Nemotron 3 Nano's shape
(nestlm/assets/configs/nemotron-3-nano-30b-a3b.json): the parent's total and active counts, every budget
reachable by the recipe's axes, each frozen by the routers within tolerance of both its total and active
goals, exportable (one expert count and width in every MoE layer), and the counts the header quotes."""

from __future__ import annotations

from pathlib import Path

import torch

import nestlm
from nestlm.elastic import training as el
from nestlm.elastic.arch import ArchSpec, parse_target, target_error
from nestlm.elastic.router import ElasticRouters, resolve_choices
from nestlm.train.plan import parent_config
from nestlm.train.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "nemotron-3-nano-30b-a3b-elastic.yaml"


def test_nano3_recipe_budgets_on_the_meta_device() -> None:
    recipe = load_recipe("nemotron-3-nano-30b-a3b-elastic")
    assert recipe == load_recipe(str(RECIPE))
    cfg = parent_config(recipe)  # model.path is not here: the shipped plan_config
    with torch.device("meta"):
        model = nestlm.HybridLM(cfg)
    full = ArchSpec.full(cfg)
    assert sum(p.numel() for p in model.parameters()) == full.num_parameters(cfg) == 31_577_937_344
    assert full.active_parameters(cfg) == 3_580_073_408
    e = recipe.elastic
    targets = el.parse_budgets(e)
    el.check_reachable(cfg, targets, e, None)  # raises when a budget lies outside what the axes allow
    routed = [n for n in e.budgets if n != "30b"]
    torch.manual_seed(0)
    routers = ElasticRouters(cfg, resolve_choices(cfg, e.axes), len(routed), d_router=e.d_router)
    text = RECIPE.read_text()
    for b, name in enumerate(routed):
        target = parse_target(e.budgets[name])
        assert target.active is not None  # every smaller budget names its active count
        spec = routers.freeze(b, target, e.tolerance)
        assert target_error(cfg, spec.to_config(cfg), target) <= e.tolerance, name
        moe = {(ls.experts, ls.ffn, ls.shared_ffn) for ls in spec.layers if ls is not None and ls.kind == "moe"}
        assert len(moe) == 1  # homogeneous: exports as a plain NemotronH MoE directory
        assert f"{spec.num_parameters(cfg):,} total / {spec.active_parameters(cfg):,} active" in text, name
    assert "31,577,937,344 total / 3,580,073,408 active" in text
