"""Routers: one small MLP per elastic axis that picks each budget's widths.

Router(axis): Linear(n_budgets -> d_router) -> LeakyReLU -> Linear(-> n_choices, or
n_layers x n_choices when heterogeneous). Input: the one-hot of the budget. Output
logits are scaled (logit scale rising 1 -> 10) and sampled with Gumbel-Softmax
(temperature annealed 1.0 -> 0.05).

hard mode: the argmax option runs *sliced* (a small budget costs less compute) and a
    straight-through factor pi_max / pi_max.detach() (== 1.0) multiplies the block
    outputs, so the task loss reaches the router without changing the forward.
soft mode: the full width runs with the mask sum_i pi_i * mask_i on every axis, applied where
    slicing cuts (hidden: the embedding, every block output and every RMSNorm's mean; Mamba
    heads: the scan output and the gated group norm's mean; attention heads: o_proj's input;
    FFN: the neuron activations; MoE: routed experts on *selection* (an expert masked to 0 can never be
chosen, the chosen ones' routing weights scaled by their mask), the experts' and the shared
expert's neurons), so that at a one-hot pi it runs the sliced sub-network.
The budget loss is |P(E[choices]) / target - 1|, zero within a tolerance, with P a
differentiable parameter count (total, or active per token for MoE; both for a target naming
both, the losses added) or memory (weights + KV + SSM state).
After training each budget's argmax choices are frozen into an ArchSpec.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..tap import Tap
from .arch import DTYPE_BYTES, ArchError, ArchSpec, Target, block_cache_bytes, block_parameters, target_error
from .axes import AXES, AXIS_FIELD, AXIS_KIND, resolve_choices  # noqa: F401  (re-exported)


class Router(nn.Module):
    """Linear(n_budgets -> d) -> LeakyReLU -> Linear(d -> rows * n_choices)."""

    def __init__(self, n_budgets: int, n_choices: int, rows: int = 1, d_router: int = 256) -> None:
        super().__init__()
        self.rows, self.n_choices = rows, n_choices
        self.net = nn.Sequential(nn.Linear(n_budgets, d_router), nn.LeakyReLU(), nn.Linear(d_router, rows * n_choices))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.net(onehot).view(self.rows, self.n_choices)  # (rows, n_choices)


@dataclass
class RouterSample:
    """Per axis: probabilities (rows, n_choices) and the chosen option per row."""

    probs: dict[str, torch.Tensor]
    choice: dict[str, torch.Tensor]


def anneal(step: int, total: int, start: float, end: float, geometric: bool) -> float:
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if geometric:
        return start * (end / start) ** t
    return start + (end - start) * t


class ElasticRouters(nn.Module):
    """The routers of every elastic axis, and the maps from their choices to ArchSpecs and costs."""

    def __init__(
        self,
        config: ModelConfig,
        choices: dict[str, list[int]],
        n_budgets: int,
        layer_order: list[int] | None = None,
        d_router: int = 256,
        heterogeneous: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.choices = choices
        self.n_budgets = n_budgets
        self.heterogeneous = heterogeneous
        if "depth" in choices and not layer_order:
            raise ArchError("the depth axis needs a layer ranking (run `nestlm importance` first)")
        self.layer_order = list(layer_order or [])
        self.layers_of = {
            axis: [i for i, ls in enumerate(config.layers) if ls.kind == kind] for axis, kind in AXIS_KIND.items()
        }
        self.routers = nn.ModuleDict()
        for axis, vals in choices.items():
            rows = len(self.layers_of[axis]) if heterogeneous and axis in AXIS_KIND else 1
            self.routers[axis] = Router(n_budgets, len(vals), rows, d_router)
        for axis in choices:  # values as buffers so they move with .to(device)
            self.register_buffer(f"values_{axis}", torch.tensor(choices[axis], dtype=torch.float32), persistent=False)

    def values(self, axis: str) -> torch.Tensor:
        return getattr(self, f"values_{axis}")

    def logits(self, budget: int) -> dict[str, torch.Tensor]:
        onehot = (
            F.one_hot(torch.tensor(budget), self.n_budgets).float().to(self.values(next(iter(self.choices))).device)
        )
        return {axis: r(onehot) for axis, r in self.routers.items()}

    def sample(
        self, budget: int, tau: float, scale: float, generator: torch.Generator | None = None, noise: bool = True
    ) -> RouterSample:
        """Gumbel-Softmax sample of every axis for budget index ``budget``."""
        probs, choice = {}, {}
        for axis, lg in self.logits(budget).items():
            z = lg * scale
            if noise:
                u = torch.rand(z.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(z.device)
                z = z - torch.log(-torch.log(u))
            p = F.softmax(z / tau, dim=-1)
            probs[axis], choice[axis] = p, p.argmax(dim=-1)
        return RouterSample(probs, choice)

    # ----------------------------------------------------------------- choices -> model
    def grid(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every homogeneous combination of choices (one index per axis), as ``arch`` takes them."""
        axes = list(self.choices)
        for combo in itertools.product(*(range(len(self.choices[a])) for a in axes)):
            yield {a: torch.tensor([c]) for a, c in zip(axes, combo, strict=True)}

    def dropped(self, n_drop: int) -> list[int]:
        return self.layer_order[:n_drop]

    def arch(self, choice: dict[str, torch.Tensor]) -> ArchSpec:
        """The ArchSpec of discrete choices (hard mode and freezing)."""
        spec = ArchSpec.full(self.config)
        hidden = int(self.choices["hidden"][int(choice["hidden"][0])]) if "hidden" in choice else spec.hidden
        layers = list(spec.layers)
        widths: dict[int, dict[str, int]] = {}  # layer -> the fields its axes set (a MoE layer has three)
        for axis, idxs in self.layers_of.items():
            if axis not in choice:
                continue
            for r, i in enumerate(idxs):
                c = int(choice[axis][r if self.heterogeneous else 0])
                widths.setdefault(i, {})[AXIS_FIELD[axis]] = int(self.choices[axis][c])
        for i, w in widths.items():
            layers[i] = dataclasses.replace(layers[i], **w)
        if "depth" in choice:
            for i in self.dropped(int(self.choices["depth"][int(choice["depth"][0])])):
                layers[i] = None
        return ArchSpec(hidden, layers).validate(self.config)

    def hard_gates(self, sample: RouterSample) -> dict[str, Any]:
        """Straight-through factors (== 1.0) carrying each chosen option's probability."""

        def st(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            v = p.gather(-1, c[..., None]).squeeze(-1)
            return v / v.detach()

        gates: list[torch.Tensor | None] = [None] * self.config.n_layers
        depth = st(sample.probs["depth"], sample.choice["depth"])[0] if "depth" in sample.probs else None
        for axis, idxs in self.layers_of.items():  # a MoE layer multiplies the factors of its three axes
            if axis not in sample.probs:
                continue
            g = st(sample.probs[axis], sample.choice[axis])
            for r, i in enumerate(idxs):
                f = g[r if self.heterogeneous else 0]
                gates[i] = f if gates[i] is None else gates[i] * f
        if depth is not None:
            gates = [depth if f is None else f * depth for f in gates]
        hidden = st(sample.probs["hidden"], sample.choice["hidden"])[0] if "hidden" in sample.probs else None
        return {"hidden": hidden, "layers": gates}

    def soft_probe(self, sample: RouterSample) -> Any:
        """A probe applying sum_i pi_i * mask_i to each layer's elastic channels (soft mode)."""
        cfg = self.config
        masks: dict[tuple[int, str], torch.Tensor] = {}
        for axis, idxs in self.layers_of.items():
            if axis not in sample.probs:
                continue
            vals = self.values(axis)
            for r, i in enumerate(idxs):
                ls = cfg.layers[i]
                p = sample.probs[axis][r if self.heterogeneous else 0]
                if axis in ("mlp", "moe_shared_ffn"):  # (the shared expert is an MLP: its "mlp_act")
                    units, name, width = getattr(ls, AXIS_FIELD[axis]), "mlp_act", 1
                elif axis == "mamba_heads":  # after the scan, so the group norm leaves masked heads out
                    units, name, width = ls.heads, "mamba_heads", ls.head_dim
                elif axis == "moe_experts":  # on selection; the first of every group, as slicing keeps
                    units, name, width = ls.experts, "moe_experts", 1
                elif axis == "moe_ffn":
                    units, name, width = ls.ffn, "moe_act", 1
                else:
                    units, name, width = ls.heads, "attn_out", ls.head_dim
                rank, limit = torch.arange(units, device=vals.device), vals
                if axis == "moe_experts":  # experts are ranked within their group: a group keeps a prefix
                    rank, limit = rank % (units // cfg.moe_n_group), vals / cfg.moe_n_group
                keep = (rank[None] < limit[:, None]).float()  # (n_choices, units)
                m = (p[:, None] * keep).sum(0)  # (units,)
                masks[(i, name)] = m.repeat_interleave(width) if width > 1 else m

        def probe(layer: int, name: str, t: torch.Tensor) -> torch.Tensor | None:
            m = masks.get((layer, name))
            return None if m is None else t * m.to(t.dtype)

        return probe

    def soft_hidden_mask(self, sample: RouterSample) -> torch.Tensor | None:
        """sum_i pi_i * mask_i over the hidden channels (the model applies it; see Tap.hidden_mask)."""
        if "hidden" not in sample.probs:
            return None
        vals = self.values("hidden")
        keep = (torch.arange(self.config.hidden_size, device=vals.device)[None] < vals[:, None]).float()
        return (sample.probs["hidden"][0][:, None] * keep).sum(0)

    def soft_gates(self, sample: RouterSample) -> dict[str, Any]:
        """Depth in soft mode: each layer's output scaled by its probability of being kept."""
        if "depth" not in sample.probs:
            return {"hidden": None, "layers": [None] * self.config.n_layers}
        keep = self.keep_probs(sample)
        return {"hidden": None, "layers": [keep[i] for i in range(self.config.n_layers)]}

    def hard_tap(self, sample: RouterSample) -> Tap:
        """The Tap of hard mode: the straight-through gates, no masks (the sub-network runs sliced)."""
        return _GateTap(self.hard_gates(sample))

    def soft_tap(self, sample: RouterSample) -> Tap:
        """The Tap of soft mode: the full width under soft masks, depth as soft gates."""
        return _MaskTap(self.soft_gates(sample), self.soft_probe(sample), self.soft_hidden_mask(sample))

    # ------------------------------------------------------------------------- costs
    def keep_probs(self, sample: RouterSample) -> torch.Tensor:
        """Probability that each layer is kept under the depth distribution (ones without depth)."""
        n = self.config.n_layers
        dev = self.values(next(iter(self.choices))).device
        if "depth" not in sample.probs:
            return torch.ones(n, device=dev)
        p = sample.probs["depth"][0]
        kept = torch.ones(len(self.choices["depth"]), n, device=dev)
        for c, n_drop in enumerate(self.choices["depth"]):
            kept[c, self.dropped(n_drop)] = 0.0
        return (p[:, None] * kept).sum(0)

    def expected_cost(
        self,
        sample: RouterSample,
        target: Target,
        dtype: torch.dtype = torch.bfloat16,
        batch: int = 1,
        context: int = 4096,
        what: str | None = None,
    ) -> torch.Tensor:
        """Differentiable P(E[choices]) of measure ``what`` ("params", "active" per token, or "memory"
        bytes; default: the target's first goal)."""
        cfg = self.config
        b = DTYPE_BYTES[dtype]
        what = what or target.goals(cfg)[0][0]

        def expect(axis: str, row: int, default: float) -> Any:
            if axis not in sample.probs:
                return default
            p = sample.probs[axis][row if self.heterogeneous and axis in AXIS_KIND else 0]
            return (p * self.values(axis)).sum()

        D = expect("hidden", 0, float(cfg.hidden_size))
        keep = self.keep_probs(sample)
        total = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D
        cache = 0.0
        rows = {i: r for idxs in self.layers_of.values() for r, i in enumerate(idxs)}
        for i, ls in enumerate(cfg.layers):
            w = {k: v for k, v in ls.to_dict().items() if k != "kind"}
            for axis, kind in AXIS_KIND.items():  # the expected width of every axis acting on this layer
                if kind == ls.kind:
                    name = AXIS_FIELD[axis]
                    w[name] = expect(axis, rows[i], float(w[name]))
            total = total + keep[i] * block_parameters(cfg, ls.kind, D, **w, active=what == "active")
            if what == "memory":
                for k in ("ffn", "experts", "shared_ffn"):
                    w.pop(k, None)
                cache = cache + keep[i] * block_cache_bytes(cfg, ls.kind, batch, context, b, **w)
        if what == "memory":
            return total * b + cache
        return total

    def budget_loss(
        self, sample: RouterSample, target: Target, tolerance: float = 0.05, **memory_kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the target's goals of |P / goal - 1| minus the tolerance, floored at 0; the expected
        cost of the first goal)."""
        losses, first = [], None
        for what, goal in target.goals(self.config):
            cost = self.expected_cost(sample, target, **memory_kw, what=what)
            losses.append(F.relu((cost / goal - 1.0).abs() - tolerance))
            first = cost if first is None else first
        return sum(losses[1:], losses[0]), first

    @torch.no_grad()
    def freeze(
        self,
        budget: int,
        target: Target | None = None,
        tolerance: float = 0.05,
        scale: float = 10.0,
        **memory_kw: Any,
    ) -> ArchSpec:
        """The budget's most probable choices (no noise) as a static ArchSpec.

        With ``target``, the most probable choices *whose exact cost is within tolerance*:
        the argmax when it already is (the usual case after training); otherwise every
        combination is scored when the routers are homogeneous, or single steps toward the
        target are taken greedily (least log-probability lost first) when heterogeneous.
        """
        logp = {a: F.log_softmax(lg * scale, dim=-1) for a, lg in self.logits(budget).items()}
        choice = {a: lp.argmax(dim=-1) for a, lp in logp.items()}
        if target is None:
            return self.arch(choice)
        cfg = self.config
        goals = target.goals(cfg)
        what, goal = goals[0]  # greedy steps follow the first goal

        def cost(ch: dict[str, torch.Tensor]) -> float:
            spec = self.arch(ch)
            return spec.memory_bytes(cfg, **memory_kw) if what == "memory" else spec.num_parameters(cfg)

        def miss(ch: dict[str, torch.Tensor]) -> float:  # the largest relative miss over every goal
            return target_error(cfg, self.arch(ch).to_config(cfg), target, **memory_kw)

        def score(ch: dict[str, torch.Tensor]) -> float:
            return float(sum(logp[a].gather(-1, c[:, None]).sum() for a, c in ch.items()))

        def ok(ch: dict[str, torch.Tensor]) -> bool:
            return miss(ch) <= tolerance

        if ok(choice):
            return self.arch(choice)
        if not self.heterogeneous:
            best, best_key = choice, None
            for ch in self.grid():
                err = miss(ch)
                key = (max(err - tolerance, 0.0), -score(ch))
                if best_key is None or key < best_key:
                    best, best_key = ch, key
            return self.arch(best)
        ch = {a: c.clone() for a, c in choice.items()}
        for _ in range(10_000):
            over = cost(ch) > goal
            moves = []
            for a, c in ch.items():
                for r in range(len(c)):
                    nxt = int(c[r]) + (1 if over else -1)  # choices are sorted large -> small
                    if 0 <= nxt < len(self.choices[a]):
                        moves.append((float(logp[a][r, nxt] - logp[a][r, c[r]]), a, r, nxt))
            if not moves:
                break
            _, a, r, nxt = max(moves)
            ch[a][r] = nxt
            if ok(ch) or (cost(ch) > goal) != over:
                break
        return self.arch(ch)


class _GateTap(Tap):
    """Router gates on the embedding and block outputs (hard mode, and depth in soft mode)."""

    def __init__(self, gates: dict[str, Any]) -> None:
        self.gates = gates

    def embedding_gate(self) -> torch.Tensor | None:
        return self.gates["hidden"]

    def block_gate(self, layer: int) -> torch.Tensor | None:
        return self.gates["layers"][layer]


class _MaskTap(_GateTap):
    """Soft mode: the gates, plus masks sum_i pi_i * mask_i on the elastic activations."""

    def __init__(self, gates: dict[str, Any], probe: Any, hidden: torch.Tensor | None) -> None:
        super().__init__(gates)
        self.probe, self.hidden = probe, hidden

    def activation(self, layer: int, name: str, t: torch.Tensor) -> torch.Tensor:
        new = self.probe(layer, name, t)
        return t if new is None else new

    def hidden_mask(self) -> torch.Tensor | None:
        return self.hidden


def gumbel_schedule(step: int, total: int, tau: tuple[float, float], scale: tuple[float, float]) -> tuple[float, float]:
    """Temperature (geometric 1.0 -> 0.05) and logit scale (linear 1 -> 10) at ``step`` of ``total``."""
    return anneal(step, total, tau[0], tau[1], geometric=True), anneal(step, total, scale[0], scale[1], geometric=False)


__all__ = [
    "AXES",
    "ElasticRouters",
    "Router",
    "RouterSample",
    "gumbel_schedule",
    "resolve_choices",
]
