"""The elastic pieces of a training run: budgets and their sampler, the routers, the loss mix, freezing.

One optimizer step trains one budget, drawn with the stage's probabilities from a seeded
generator (the same on every rank). The full budget runs the whole model with no masks;
any other budget samples its routers (Gumbel-Softmax) and, in hard mode, runs its
sub-network *sliced*. Loss = KL(teacher || student) + lambda * budget loss. At the end,
each budget's argmax choices are frozen into a ``Budget`` record.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..checkpoint import Budget
from ..config import ModelConfig
from ..errors import NestlmError
from ..train.losses import ce_loss, kd_loss
from .arch import ArchSpec, Target, closest_homogeneous, count_parameters, measure, parse_target, target_error
from .axes import AXIS_FIELD
from .router import ElasticRouters, RouterSample, resolve_choices

if TYPE_CHECKING:
    from ..train.recipe import ElasticSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def memory_kw(e: ElasticSection) -> dict[str, Any]:
    """The dtype, batch and context that memory targets are counted at."""
    m = e.memory
    return {"dtype": DTYPES[m.dtype], "batch": m.batch, "context": m.context}


def parse_budgets(e: ElasticSection) -> dict[str, Target]:
    return {name: parse_target(t) for name, t in e.budgets.items()}


def make_routers(cfg: ModelConfig, e: ElasticSection, n_budgets: int, layer_order: list[int] | None) -> ElasticRouters:
    return ElasticRouters(
        cfg,
        resolve_choices(cfg, e.axes, width_multiple=e.width_multiple),
        n_budgets=n_budgets,
        layer_order=layer_order,
        d_router=e.d_router,
        heterogeneous=e.heterogeneous,
    )


def fixed_archs(
    cfg: ModelConfig, targets: dict[str, Target], names: list[str], e: ElasticSection
) -> dict[str, ArchSpec]:
    """``elastic.router: fixed``: each budget's homogeneous one-shot architecture (as ``nestlm prune``)."""
    kw = memory_kw(e)
    return {
        n: closest_homogeneous(cfg, targets[n], tolerance=e.tolerance, width_multiple=e.width_multiple, **kw)
        for n in names
    }


def warm_start_routers(
    routers: ElasticRouters,
    cfg: ModelConfig,
    targets: dict[str, Target],
    routed: list[str],
    e: ElasticSection,
    p: float = 0.6,
) -> dict[str, ArchSpec]:
    """``elastic.router_init: one-shot``: fit the routers, before training, to put probability ``p``
    on each budget's one-shot choice, and return those choices (budget -> ArchSpec).

    The one-shot choice is the grid combination (of the axes' choices) within the tolerance of every
    goal that is nearest, in the sum over axes of |log width ratio|, to the homogeneous architecture
    ``nestlm prune`` picks (one factor for every width, the MLP solved for the rest). Randomly
    initialised routers commit within a few dozen steps to choices whose one-shot distillation loss
    is far worse (benchmarks/study_claim1.py); this starts them where pruning would, free to move.
    Plain Adam on the routers alone (no random draws: a run's other random streams are unchanged).
    """
    if routers.heterogeneous:
        raise NestlmError("elastic.router_init: one-shot needs homogeneous routers (elastic.heterogeneous: false)")
    kw = memory_kw(e)
    want_idx: dict[int, dict[str, int]] = {}
    chosen: dict[str, ArchSpec] = {}
    for j, name in enumerate(routed):
        spec = closest_homogeneous(cfg, targets[name], tolerance=e.tolerance, width_multiple=e.width_multiple, **kw)
        want = {"hidden": spec.hidden, "depth": 0}
        for a in routers.choices:
            if a in AXIS_FIELD:
                want[a] = getattr(spec.layers[routers.layers_of[a][0]], AXIS_FIELD[a])
        best_key = None
        for ch in routers.grid():
            arch = routers.arch(ch)
            miss = target_error(cfg, arch.to_config(cfg), targets[name], **kw)
            dist = sum(abs(math.log((routers.choices[a][int(c)] + 1) / (want[a] + 1))) for a, c in ch.items())
            key = (max(miss - e.tolerance, 0.0), dist)
            if best_key is None or key < best_key:
                best_key, want_idx[j], chosen[name] = key, {a: int(c) for a, c in ch.items()}, arch
    _fit_routers(routers, want_idx, p)
    return chosen


@torch.no_grad()
def search_router_init(
    routers: ElasticRouters,
    model: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    targets: dict[str, Target],
    routed: list[str],
    e: ElasticSection,
    p: float = 0.6,
) -> dict[str, ArchSpec]:
    """``elastic.router_init: search``: fit the routers, before training, to put probability ``p`` on each
    budget's grid choice (within the tolerance of every goal) whose one-shot distillation loss is lowest:
    KL(parent || parent at that sub-network) on the target tokens of ``batches`` (x, y), the parent
    untrained for it. Returns those choices (budget -> ArchSpec).

    The routers from a random start commit within the first third of a run to whichever sub-network the
    early, noisy gradients favour, and at the 50% budget the seeds' choices scored 54% or 26% (the claim-1
    investigation); pruning's uniform choice (``one-shot``) starts them at a poor one. The one-shot KD
    loss ranks sub-networks the way their trained quality does (the investigation's KD table), and it is
    measured, the same for every seed. A forward per candidate and batch, no random draws."""
    if routers.heterogeneous:
        raise NestlmError("elastic.router_init: search needs homogeneous routers (elastic.heterogeneous: false)")
    cfg, kw = routers.config, memory_kw(e)
    was_training = model.training
    model.eval()
    teacher = [model(x).logits for x, _ in batches]
    want_idx: dict[int, dict[str, int]] = {}
    chosen: dict[str, ArchSpec] = {}
    grid = list(routers.grid())
    for j, name in enumerate(routed):
        best = None
        for ch in grid:
            arch = routers.arch(ch)
            if target_error(cfg, arch.to_config(cfg), targets[name], **kw) > e.tolerance:
                continue
            loss = sum(
                float(kd_loss(model(x, arch=arch).logits, t, 1.0, y))
                for (x, y), t in zip(batches, teacher, strict=True)
            )
            if best is None or loss < best[0]:
                best = (loss, {a: int(c) for a, c in ch.items()}, arch)
        if best is None:
            raise NestlmError(f"budget {name!r}: no choice of the axes lies within the tolerance; widen elastic.axes")
        _, want_idx[j], chosen[name] = best
    model.train(was_training)
    with torch.enable_grad():
        _fit_routers(routers, want_idx, p)
    return chosen


def _fit_routers(routers: ElasticRouters, want_idx: dict[int, dict[str, int]], p: float) -> None:
    """Plain Adam on the routers alone until each budget's wanted choices hold probability ``p`` (no further:
    the routers stay free to move); no random draws, so a run's other random streams are unchanged."""
    opt = torch.optim.Adam(routers.parameters(), lr=1e-2)
    for _ in range(500):
        loss, done = 0.0, True
        for j, idx in want_idx.items():
            for a, lg in routers.logits(j).items():
                logp = F.log_softmax(lg[0], dim=-1)[idx[a]]
                done &= float(logp.detach().exp()) >= p
                loss = loss + F.relu(math.log(p) - logp)  # up to p, no further: the routers stay free to move
        if done:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()


def check_reachable(cfg: ModelConfig, targets: dict[str, Target], e: ElasticSection, layer_order: Any) -> None:
    """Every parameter goal (total or active) lies between the smallest choice the axes allow and the parent."""
    for name, t in targets.items():
        goals = [(what, p) for what, p in t.goals(cfg) if what != "memory"]
        if not goals:
            continue
        # (built per target, as before active targets: the routers' init draws from the global RNG,
        # and a run's router initialisation must not change)
        choices = resolve_choices(cfg, e.axes, width_multiple=e.width_multiple)
        smallest = ArchSpec.full(cfg)
        if choices:
            routers = ElasticRouters(cfg, choices, 1, layer_order=layer_order)
            smallest = routers.arch({a: torch.tensor([len(v) - 1]) for a, v in choices.items()})
        for what, p in goals:
            unit = "active parameters" if what == "active" else "parameters"
            top = measure(cfg, what)
            if p > top * 1.0001:
                raise NestlmError(f"budget {name!r} asks for {p:.4g} {unit}; the parent has only {top:.4g}")
            low = measure(smallest.to_config(cfg), what)
            if p < low * (1 - e.tolerance):
                raise NestlmError(
                    f"budget {name!r} ({t}) = {p:.4g} {unit} is below the smallest choice the axes allow "
                    f"({low:.4g}); add smaller choices to elastic.axes or raise the budget"
                )


class BudgetSampler:
    """Draws the budget of each step with the stage's probabilities; its state resumes exactly."""

    def __init__(self, names: list[str], seed: int) -> None:
        self.names = names
        self.rng = random.Random(seed)

    def draw(self, probs: list[float]) -> str:
        return self.rng.choices(self.names, weights=probs, k=1)[0]


def student_loss(
    forward: Callable[..., torch.Tensor],
    model: torch.nn.Module,
    routers: ElasticRouters | None,
    sample: RouterSample | None,
    arch: ArchSpec | None,
    x: torch.Tensor,
    y: torch.Tensor,
    t_logits: torch.Tensor,
    e: ElasticSection,
) -> torch.Tensor:
    """The distillation loss of one micro-batch at the step's budget (+ CE for a trainable teacher)."""
    if sample is None:  # the full budget (no masks), or a fixed sub-network (elastic.router: fixed)
        s_logits = forward(model, x, arch=arch)
        loss = kd_loss(s_logits, t_logits, e.kd_temperature, y)
        if e.trainable_teacher and arch is None:  # CE trains the full model itself, not a fixed sub-network
            loss = loss + ce_loss(s_logits, y)
        return loss
    if e.mask == "hard":
        s_logits = forward(model, x, arch=arch, tap=routers.hard_tap(sample))
    else:
        s_logits = forward(model, x, tap=routers.soft_tap(sample))
    return kd_loss(s_logits, t_logits, e.kd_temperature, y)


def _warn_if_moved(name: str, argmax: ArchSpec, frozen: ArchSpec, cfg: ModelConfig, e: ElasticSection) -> None:
    """Say so when the routers' own choice lies outside the tolerance, so freezing took another one.

    Near the end of a run the router probabilities saturate (tau ~0.05, logit scale ~10), and the
    budget loss's gradient through them vanishes: a choice just outside the tolerance then stays
    there, and the frozen sub-network is one training seldom ran (benchmarks/study_claim1.py)."""
    if argmax.to_dict() == frozen.to_dict():
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    a, f, total = argmax.num_parameters(cfg), frozen.num_parameters(cfg), count_parameters(cfg)
    warnings.warn(
        f"budget {name!r}: the routers' own choice ({a:,} parameters, {a / total:.1%}) is outside the "
        f"{e.tolerance:.0%} tolerance, so the budget is frozen to the most probable choice within it ({f:,}), "
        "another sub-network than the one the routers prefer and training seldom ran: expect it to score "
        "poorly (its budget record says own_choice: false). Raise elastic.budget_loss_weight or "
        "elastic.tolerance, or try elastic.router: fixed",
        stacklevel=2,
    )


def freeze_budgets(
    cfg: ModelConfig,
    names: list[str],
    targets: dict[str, Target],
    routed: list[str],
    routers: ElasticRouters | None,
    e: ElasticSection,
    elastic: bool,
    fixed: dict[str, ArchSpec] | None = None,
) -> dict[str, Budget]:
    """Each budget's frozen architecture (within tolerance of its target) as a Budget record."""
    total = count_parameters(cfg)
    out = {}
    for name in names:
        t = targets.get(name, Target("fraction", 1.0))
        own = None
        if fixed and name in fixed:
            spec = fixed[name]
        elif name in routed:
            spec = routers.freeze(routed.index(name), t, e.tolerance, scale=e.logit_scale[1], **memory_kw(e))
            argmax = routers.freeze(routed.index(name), scale=e.logit_scale[1])
            own = argmax.to_dict() == spec.to_dict()
            _warn_if_moved(name, argmax, spec, cfg, e)
        else:
            spec = ArchSpec.full(cfg)
        n = spec.num_parameters(cfg)
        m = e.memory
        out[name] = Budget(
            name=name,
            target=str(e.budgets.get(name, 1.0)) if elastic else "1.0",
            target_description=str(t),
            arch=spec,
            params=n,
            fraction=n / total,
            memory_bytes=spec.memory_bytes(cfg, DTYPES[m.dtype], m.batch, m.context),
            active_params=spec.active_parameters(cfg),
            own_choice=own,
        )
    return out
