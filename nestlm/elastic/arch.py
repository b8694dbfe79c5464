"""ArchSpec: the active sub-network of a parent model, with exact counts.

An ArchSpec holds the global hidden size and, per parent layer, either None (the
layer is dropped: an identity) or a LayerSpec of its active widths. Active widths
are prefixes of the parent's weights in importance order (see model.py), so one
parent holds every ArchSpec at once. Counts here are exact: they equal the
parameter count of ``model.slice(spec)``, and the bytes of serving it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, LayerSpec, ModelConfig, check_moe_experts
from .axes import WIDTH_MULTIPLE, width_step  # noqa: F401  (re-exported)
from .counts import (  # noqa: F401  (re-exported: the counts were first defined here)
    DTYPE_BYTES,
    active_parameters,
    block_cache_bytes,
    block_parameters,
    count_parameters,
    layer_parameters,
    memory_bytes,
)
from .targets import MEASURES, ArchError, Target, measure, parse_target, target_error  # noqa: F401  (re-exported)


def _layer_spec(i: int, kind: str, build: Callable[[], LayerSpec]) -> LayerSpec:
    """Build a LayerSpec; its own checks (ConfigError) become an ArchError naming the layer."""
    try:
        return build()
    except ConfigError as e:
        raise ArchError(f"layer {i} ({kind}): {e}") from None


def _check_moe(where: str, config: ModelConfig, p: LayerSpec, a: LayerSpec) -> None:
    """A nested MoE layer keeps the same number of experts in every group, routable by the parent's top-k."""
    for name, what in (("experts", "routed experts"), ("ffn", "expert width"), ("shared_ffn", "shared-expert width")):
        if getattr(a, name) > getattr(p, name):
            raise ArchError(f"{where}: {what} {getattr(a, name)} exceeds the parent's {getattr(p, name)}")
    try:
        check_moe_experts(config, a.experts)
    except ConfigError as e:
        raise ArchError(f"{where}: {e}") from None


@dataclass
class ArchSpec:
    """Active sub-network: global ``hidden`` and one LayerSpec (or None = dropped) per parent layer."""

    hidden: int
    layers: list[LayerSpec | None]

    # ---------------------------------------------------------------- builders
    @classmethod
    def full(cls, config: ModelConfig) -> ArchSpec:
        """The parent itself."""
        return cls(config.hidden_size, [dataclasses.replace(ls) for ls in config.layers])

    @classmethod
    def per_layer(cls, config: ModelConfig, hidden: int, layers: list[LayerSpec | dict | None]) -> ArchSpec:
        """A heterogeneous spec: widths given layer by layer (dicts of the active widths, or None)."""
        if len(layers) != config.n_layers:
            raise ArchError(f"per-layer spec has {len(layers)} entries; the parent has {config.n_layers} layers")
        out: list[LayerSpec | None] = []
        for i, (parent, ls) in enumerate(zip(config.layers, layers, strict=True)):
            if ls is None:
                out.append(None)
            elif isinstance(ls, LayerSpec):
                out.append(ls)
            else:
                d = dict(ls)
                if d.get("kind", parent.kind) != parent.kind:
                    raise ArchError(
                        f"layer {i} ({parent.kind}): per-layer spec says kind {d['kind']!r}; "
                        "a layer's kind cannot change"
                    )
                out.append(
                    _layer_spec(i, parent.kind, lambda d=d, parent=parent: LayerSpec.from_dict(parent.to_dict() | d))
                )
        spec = cls(hidden, out)
        spec.validate(config)
        return spec

    def replace(
        self,
        config: ModelConfig | None = None,
        *,
        hidden: int | None = None,
        mlp: int | None = None,
        mamba_heads: int | None = None,
        mamba_head_dim: int | None = None,
        attn_heads: int | None = None,
        kv_heads: int | None = None,
        experts: int | None = None,
        expert_ffn: int | None = None,
        shared_ffn: int | None = None,
        drop_layers: list[int] | None = None,
    ) -> ArchSpec:
        """A copy with the same width in every layer of a kind (None keeps the current widths).

        MoE layers: ``experts`` routed experts (the first of every group), ``expert_ffn`` the width
        of every expert, ``shared_ffn`` the shared expert's.
        ``drop_layers`` lists parent layer indices to drop (in addition to those already dropped).
        """
        layers: list[LayerSpec | None] = []
        drop = set(drop_layers or [])
        for i, ls in enumerate(self.layers):
            if ls is None or i in drop:
                layers.append(None)
                continue
            if ls.kind == "mamba":
                new = {
                    "heads": ls.heads if mamba_heads is None else mamba_heads,
                    "head_dim": ls.head_dim if mamba_head_dim is None else mamba_head_dim,
                }
            elif ls.kind == "attention":
                new = {
                    "heads": ls.heads if attn_heads is None else attn_heads,
                    "kv_heads": ls.kv_heads if kv_heads is None else kv_heads,
                }
            elif ls.kind == "moe":
                new = {
                    "experts": ls.experts if experts is None else experts,
                    "ffn": ls.ffn if expert_ffn is None else expert_ffn,
                    "shared_ffn": ls.shared_ffn if shared_ffn is None else shared_ffn,
                }
            else:
                new = {"ffn": ls.ffn if mlp is None else mlp}
            layers.append(_layer_spec(i, ls.kind, lambda ls=ls, new=new: dataclasses.replace(ls, **new)))
        spec = ArchSpec(self.hidden if hidden is None else hidden, layers)
        bad = [i for i in drop if not 0 <= i < len(self.layers)]
        if bad:
            raise ArchError(f"drop_layers has index {bad[0]}; layers are 0..{len(self.layers) - 1}")
        if config is not None:
            spec.validate(config)
        return spec

    # -------------------------------------------------------------- validity
    def validate(self, config: ModelConfig) -> ArchSpec:
        """Raise ArchError (one line: what is wrong, what is allowed) unless the parent nests this spec."""
        if len(self.layers) != config.n_layers:
            raise ArchError(f"ArchSpec has {len(self.layers)} layers; the parent has {config.n_layers}")
        if (
            not isinstance(self.hidden, int)
            or isinstance(self.hidden, bool)
            or not 1 <= self.hidden <= config.hidden_size
        ):
            raise ArchError(f"hidden {self.hidden} must be within 1..{config.hidden_size}")
        if all(ls is None for ls in self.layers):
            raise ArchError("an ArchSpec must keep at least one layer")
        for i, (p, a) in enumerate(zip(config.layers, self.layers, strict=True)):
            if a is None:
                continue
            where = f"layer {i} ({p.kind})"
            if not isinstance(a, LayerSpec):
                raise ArchError(f"{where}: expected a LayerSpec or None (dropped), got {type(a).__name__}")
            if a.kind != p.kind:
                raise ArchError(f"{where}: ArchSpec says {a.kind!r}; a layer's kind cannot change")
            if p.kind == "mamba":
                if a.groups != p.groups or a.d_state != p.d_state:
                    raise ArchError(f"{where}: groups and d_state are not elastic (parent {p.groups}, {p.d_state})")
                if a.heads > p.heads:
                    raise ArchError(f"{where}: {a.heads} Mamba heads exceed the parent's {p.heads}")
                if a.heads % p.groups:
                    raise ArchError(
                        f"{where}: Mamba heads {a.heads} must be a multiple of the {p.groups} groups "
                        "(every group keeps the same number of heads)"
                    )
                if a.head_dim > p.head_dim:
                    raise ArchError(f"{where}: Mamba head_dim {a.head_dim} exceeds the parent's {p.head_dim}")
            elif p.kind == "attention":
                if a.head_dim != p.head_dim:
                    raise ArchError(f"{where}: attention head_dim is not elastic (parent {p.head_dim})")
                if a.kv_heads > p.kv_heads:
                    raise ArchError(f"{where}: {a.kv_heads} KV heads exceed the parent's {p.kv_heads}")
                if a.heads % a.kv_heads:
                    raise ArchError(
                        f"{where}: query heads {a.heads} must be a multiple of the active KV heads {a.kv_heads}"
                    )
                if a.heads // a.kv_heads > p.heads // p.kv_heads:
                    raise ArchError(
                        f"{where}: {a.heads // a.kv_heads} query heads per KV group exceed the parent's "
                        f"{p.heads // p.kv_heads}"
                    )
            elif p.kind == "moe":
                _check_moe(where, config, p, a)
            elif a.ffn > p.ffn:
                raise ArchError(f"{where}: MLP width {a.ffn} exceeds the parent's {p.ffn}")
        return self

    def is_full(self, config: ModelConfig) -> bool:
        return self.hidden == config.hidden_size and self.layers == list(config.layers)

    def is_homogeneous(self) -> bool:
        """Same widths in every kept layer of a kind (what the Hugging Face format can express)."""
        seen: dict[str, LayerSpec] = {}
        for ls in self.layers:
            if ls is not None and seen.setdefault(ls.kind, ls) != ls:
                return False
        return True

    # ---------------------------------------------------------------- counts
    def to_config(self, config: ModelConfig) -> ModelConfig:
        """The standalone config of this sub-network (dropped layers removed)."""
        self.validate(config)
        layers = [dataclasses.replace(ls) for ls in self.layers if ls is not None]
        return dataclasses.replace(config, hidden_size=self.hidden, layers=layers)

    def num_parameters(self, config: ModelConfig) -> int:
        """Exact parameter count of the sliced model."""
        self.validate(config)
        return count_parameters(self.to_config(config))

    def active_parameters(self, config: ModelConfig) -> int:
        """Exact parameters per token of the sliced model (MoE layers: top-k routed experts)."""
        self.validate(config)
        return active_parameters(self.to_config(config))

    def memory_bytes(
        self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16, batch: int = 1, context: int = 4096
    ) -> int:
        """Bytes to serve it: weights + attention KV cache + Mamba conv state (in ``dtype``) + SSM state (fp32)."""
        self.validate(config)
        return memory_bytes(self.to_config(config), dtype, batch, context)

    # ------------------------------------------------------------ round trip
    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "layers": [None if ls is None else ls.to_dict() for ls in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], config: ModelConfig | None = None) -> ArchSpec:
        layers = [
            None if d is None else _layer_spec(i, str(d.get("kind")), lambda d=d: LayerSpec.from_dict(d))
            for i, d in enumerate(data["layers"])
        ]
        spec = cls(data["hidden"], layers)
        if config is not None:
            spec.validate(config)
        return spec

    def describe(self) -> str:
        """A short human summary: hidden, widths per kind, dropped layers."""
        parts = [f"hidden={self.hidden}"]
        for kind, keys in (
            ("mamba", ("heads", "head_dim")),
            ("attention", ("heads", "kv_heads")),
            ("mlp", ("ffn",)),
            ("moe", ("experts", "ffn", "shared_ffn")),
        ):
            vals = sorted(
                {tuple(getattr(ls, k) for k in keys) for ls in self.layers if ls is not None and ls.kind == kind}
            )
            if vals:
                txt = "/".join("x".join(str(v) for v in t) for t in vals)
                parts.append(f"{kind}[{'x'.join(keys)}]={txt}")
        dropped = [i for i, ls in enumerate(self.layers) if ls is None]
        if dropped:
            parts.append(f"dropped={dropped}")
        return " ".join(parts)


# --------------------------------------------------------------------------- one-shot search
def _round_to(x: float, step: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x / step) * step)))


def _expert_counts(config: ModelConfig, e0: LayerSpec | None, target: Target) -> list[int | None]:
    """Routed-expert counts the one-shot search tries: all of them, or, when a target asks for a total
    *and* an active count (only expert count tells them apart), every count routing allows."""
    if e0 is None:
        return [None]
    if len(target.goals(config)) < 2:
        return [e0.experts]
    out = []
    for n in range(e0.experts, 0, -config.moe_n_group):
        try:
            check_moe_experts(config, n)
        except ConfigError:
            continue
        out.append(n)
    return out


def closest_homogeneous(
    config: ModelConfig,
    target: Target,
    tolerance: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    context: int = 4096,
    min_width: float = 0.125,
    width_multiple: int = WIDTH_MULTIPLE,
) -> ArchSpec:
    """The homogeneous ArchSpec (same widths in every layer of a kind, no dropped layer) closest to
    ``target``, shrinking hidden, Mamba heads, attention heads and expert widths by one common
    factor and solving the MLP width for the rest (Minitron-style width pruning); a target with a
    total and an active count also chooses the number of routed experts (fewer experts cut the
    total, not the active count). Channel widths are multiples of ``width_multiple`` (below the
    parent's own). When one common factor cannot land within the tolerance (coarse width grids, a
    parent without MLP layers), each width may also round to its other neighbour. Within
    ``tolerance`` of every goal, or ArchError. No width goes below ``min_width`` of the parent's:
    past that a "sub-network" is noise.
    """
    full = ArchSpec.full(config)
    mambas = [ls for ls in config.layers if ls.kind == "mamba"]
    attns = [ls for ls in config.layers if ls.kind == "attention"]
    mlps = [ls for ls in config.layers if ls.kind == "mlp"]
    m0, a0, f0 = (mambas[0] if mambas else None), (attns[0] if attns else None), (mlps[0] if mlps else None)
    e0 = next((ls for ls in config.layers if ls.kind == "moe"), None)
    if not full.is_homogeneous():
        raise ArchError("one-shot pruning needs a parent with the same widths in every layer of a kind")
    D = config.hidden_size
    hstep = width_step(D, width_multiple)
    fstep = width_step(f0.ffn, width_multiple) if f0 is not None else 1
    estep = width_step(e0.ffn, width_multiple) if e0 is not None else 1
    sstep = width_step(e0.shared_ffn, width_multiple) if e0 is not None else 1
    goals = target.goals(config)
    mkw = {"dtype": dtype, "batch": batch, "context": context}

    def costs(spec: ArchSpec) -> list[float]:
        c = spec.to_config(config)
        return [measure(c, what, **mkw) for what, _ in goals]

    def miss(spec: ArchSpec) -> float:
        return max(abs(c / g - 1) for c, (_, g) in zip(costs(spec), goals, strict=True))

    # the widths one factor scales: name -> (parent's width, step, lowest)
    scaled: dict[str, tuple[int, int, int]] = {"hidden": (D, hstep, hstep)}
    if m0 is not None:
        scaled["mamba_heads"] = (m0.heads, m0.groups, m0.groups)
    if a0 is not None:
        scaled["attn_heads"] = (a0.heads, a0.kv_heads, a0.kv_heads)
    if e0 is not None:  # MoE: the routed experts and the shared expert narrower by the same factor
        scaled["expert_ffn"] = (e0.ffn, estep, estep)
        scaled["shared_ffn"] = (e0.shared_ffn, sstep, sstep)

    def widths(s: float, experts: int | None, ups: tuple[str, ...] | None = None) -> dict[str, int]:
        """Each width at s times the parent's on its grid: rounded to nearest, or (``ups`` given) down,
        and up for the names in ``ups``."""
        kw: dict[str, Any] = {}
        for name, (w, step, lo) in scaled.items():
            if ups is None:
                kw[name] = _round_to(s * w, step, lo, w)
            else:
                q = math.ceil(s * w / step) if name in ups else math.floor(s * w / step)
                kw[name] = int(min(w, max(lo, q * step)))
        if e0 is not None:
            kw["experts"] = experts
        return kw

    goal = goals[0][1]  # the MLP width is solved for the first goal
    counts = _expert_counts(config, e0, target)

    def expert_options(s: float) -> list[int | None]:
        """Counts near the one that meets the total at scale s (the total is linear in the count)."""
        if len(counts) < 3:
            return counts
        ti = next(i for i, (w, _) in enumerate(goals) if w == "params")
        hi, lo = (costs(full.replace(**widths(s, n)))[ti] for n in (counts[0], counts[-1]))
        want = counts[-1] + (goals[ti][1] - lo) / max(hi - lo, 1e-9) * (counts[0] - counts[-1])
        return sorted(counts, key=lambda n: abs(n - want))[:2]

    def solve_mlp(kw: dict[str, Any]) -> None:
        if f0 is not None:  # the first cost is linear in the MLP width: solve for it
            f_lo = _round_to(min_width * f0.ffn, fstep, fstep, f0.ffn)
            c_lo = costs(full.replace(**kw, mlp=f_lo))[0]
            c_hi = costs(full.replace(**kw, mlp=f0.ffn))[0]
            per = (c_hi - c_lo) / max(f0.ffn - f_lo, 1)
            kw["mlp"] = f0.ffn if per == 0 else _round_to(f_lo + (goal - c_lo) / per, fstep, f_lo, f0.ffn)

    def search(variants: list[tuple[str, ...] | None]) -> tuple[float, float, ArchSpec]:
        best: tuple[float, float, ArchSpec] | None = None
        seen: set[tuple] = set()
        steps = 200
        for k in range(steps, int(min_width * steps) - 1, -1):
            s = k / steps
            for experts in expert_options(s):
                for ups in variants:
                    kw = widths(s, experts, ups)
                    key0 = tuple(sorted(kw.items()))
                    if key0 in seen:
                        continue
                    seen.add(key0)
                    solve_mlp(kw)
                    spec = full.replace(**kw)
                    err = miss(spec)
                    if ups is None:  # one factor: the MLP width as close to it as the goal allows
                        balance = abs(kw["mlp"] / f0.ffn - s) if f0 is not None else 0.0
                    else:  # the spread of the kept fractions over every width
                        fr = [kw[n] / w for n, (w, _, _) in scaled.items()]
                        fr += [kw["mlp"] / f0.ffn] if f0 is not None else []
                        balance = max(fr) - min(fr)
                    key = (0.0 if err <= tolerance else err, balance)
                    if best is None or key < best[:2]:
                        best = (key[0], key[1], spec)
        assert best is not None
        return best

    spec = search([None])[2]
    if miss(spec) > tolerance:  # one factor cannot land within the tolerance: each width rounds down or up
        names = tuple(scaled)
        ups = [tuple(n for i, n in enumerate(names) if mask >> i & 1) for mask in range(2 ** len(names))]
        spec = search(ups)[2]
    if miss(spec) > tolerance:
        smallest = full.replace(
            **{n: _round_to(min_width * w, step, lo, w) for n, (w, step, lo) in scaled.items()},
            mlp=_round_to(min_width * f0.ffn, fstep, fstep, f0.ffn) if f0 else None,
            experts=counts[-1] if e0 else None,
        )

        def txt(cs: list[float]) -> str:
            return " / ".join(f"{c:.4g} {'bytes' if w == 'memory' else w}" for c, (w, _) in zip(cs, goals, strict=True))

        want = txt([g for _, g in goals])
        lo_c, hi_c = costs(smallest), costs(full)
        inside = all(lo <= g <= hi for lo, hi, (_, g) in zip(lo_c, hi_c, goals, strict=True))
        why = (
            f"no homogeneous sub-network with widths in multiples of {width_multiple} lands within it (the closest "
            f"has {txt(costs(spec))}); raise the tolerance, or lower width_multiple for finer steps"
            if inside
            else f"the smallest nests {txt(lo_c)}, the parent {txt(hi_c)}; give a budget in that range"
        )
        raise ArchError(f"budget {target} ({want}) cannot be reached within {tolerance * 100:g}%: {why}")
    return spec
