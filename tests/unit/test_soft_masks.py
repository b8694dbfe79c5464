"""Soft masks cut where slicing cuts: at a one-hot router output the soft-masked forward is the sliced one."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nestlm.elastic import training as el
from nestlm.elastic.router import RouterSample
from nestlm.train import setup
from nestlm.train.recipe import load_recipe


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_one_hot_soft_mask_equals_sliced_subnetwork(heterogeneous: bool, one_thread: None) -> None:
    ov = [f"elastic.heterogeneous={str(heterogeneous).lower()}"] + (["elastic.router_init=random"] * heterogeneous)
    r = load_recipe("tiny", ov)
    model = setup.build_parent(r).eval()
    routers = el.make_routers(model.config, r.elastic, 2, None)
    choices = routers.choices
    x = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x).logits
        combos = list(itertools.product(*(range(len(v)) for v in choices.values())))
        if heterogeneous:  # per-layer rows: each row of an axis its own choice, cycled through the combos
            combos = combos[::7]
        worst, moved = 0.0, 0
        for combo in combos:  # every choice of every axis: each budget of the tiny recipe is one of these
            choice, probs = {}, {}
            for k, (axis, c) in enumerate(zip(choices, combo, strict=True)):
                rows = routers.routers[axis].rows
                idx = torch.tensor([(c + k * j) % len(choices[axis]) for j in range(rows)])
                choice[axis], probs[axis] = idx, F.one_hot(idx, len(choices[axis])).float()
            spec = routers.arch(choice)
            soft = model(x, tap=routers.soft_tap(RouterSample(probs, choice))).logits
            sliced = model.slice(spec)(x).logits
            worst = max(worst, float((soft - sliced).abs().max()))
            moved += float((sliced - full).abs().max()) > 1e-3  # the sub-network differs from the parent
    assert worst <= 1e-5, worst
    assert moved >= len(combos) - 1  # only the all-full combination equals the parent
