"""ArchSpec: the active sub-network of a parent model, with exact counts.

An ArchSpec holds the global hidden size and, per parent layer, either None (the
layer is dropped: an identity) or a LayerSpec of its active widths. Active widths
are prefixes of the parent's weights in importance order (see model.py), so one
parent holds every ArchSpec at once. Counts here are exact: they equal the
parameter count of ``model.slice(spec)``, and the bytes of serving it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LayerSpec, ModelConfig
from ..errors import NestlmError

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class ArchError(NestlmError):
    """An ArchSpec that the parent cannot nest."""


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
        for parent, ls in zip(config.layers, layers, strict=True):
            if ls is None:
                out.append(None)
            elif isinstance(ls, LayerSpec):
                out.append(ls)
            else:
                d = parent.to_dict() | dict(ls)
                out.append(LayerSpec.from_dict(d))
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
        drop_layers: list[int] | None = None,
    ) -> ArchSpec:
        """A copy with the same width in every layer of a kind (None keeps the current widths).

        ``drop_layers`` lists parent layer indices to drop (in addition to those already dropped).
        """
        layers: list[LayerSpec | None] = []
        drop = set(drop_layers or [])
        for i, ls in enumerate(self.layers):
            if ls is None or i in drop:
                layers.append(None)
                continue
            if ls.kind == "mamba":
                ls = dataclasses.replace(
                    ls,
                    heads=ls.heads if mamba_heads is None else mamba_heads,
                    head_dim=ls.head_dim if mamba_head_dim is None else mamba_head_dim,
                )
            elif ls.kind == "attention":
                ls = dataclasses.replace(
                    ls,
                    heads=ls.heads if attn_heads is None else attn_heads,
                    kv_heads=ls.kv_heads if kv_heads is None else kv_heads,
                )
            else:
                ls = dataclasses.replace(ls, ffn=ls.ffn if mlp is None else mlp)
            layers.append(ls)
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
        if not 1 <= self.hidden <= config.hidden_size:
            raise ArchError(f"hidden {self.hidden} must be within 1..{config.hidden_size}")
        if all(ls is None for ls in self.layers):
            raise ArchError("an ArchSpec must keep at least one layer")
        for i, (p, a) in enumerate(zip(config.layers, self.layers, strict=True)):
            if a is None:
                continue
            where = f"layer {i} ({p.kind})"
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
        spec = cls(data["hidden"], [None if d is None else LayerSpec.from_dict(d) for d in data["layers"]])
        if config is not None:
            spec.validate(config)
        return spec

    def describe(self) -> str:
        """A short human summary: hidden, widths per kind, dropped layers."""
        parts = [f"hidden={self.hidden}"]
        for kind, keys in (("mamba", ("heads", "head_dim")), ("attention", ("heads", "kv_heads")), ("mlp", ("ffn",))):
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


def layer_parameters(config: ModelConfig, ls: LayerSpec, hidden: int | None = None) -> int:
    """Parameters of one block (its pre-norm included) at hidden size ``hidden``."""
    D = config.hidden_size if hidden is None else hidden
    n = D  # pre-norm
    if ls.kind == "mamba":
        HP, bc = ls.heads * ls.head_dim, 2 * ls.groups * ls.d_state
        rows = 2 * HP + bc + ls.heads
        n += D * rows + (rows if config.mamba_proj_bias else 0)  # in_proj
        n += (HP + bc) * config.mamba_conv_kernel + ((HP + bc) if config.mamba_conv_bias else 0)  # conv1d
        n += 3 * ls.heads + HP  # dt_bias, A_log, D, gated-norm weight
        n += HP * D + (D if config.mamba_proj_bias else 0)  # out_proj
    elif ls.kind == "attention":
        q, kv = ls.heads * ls.head_dim, ls.kv_heads * ls.head_dim
        n += D * (q + 2 * kv) + q * D
        if config.attention_bias:
            n += q + 2 * kv + D
    else:
        mats = 3 if config.mlp_act == "swiglu" else 2
        n += mats * D * ls.ffn
        if config.mlp_bias:
            n += (mats - 1) * ls.ffn + D
    return n


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count of a HybridLM built from ``config``."""
    D, V = config.hidden_size, config.vocab_size
    n = V * D + D + (0 if config.tie_embeddings else V * D)  # embeddings, norm_f, lm_head
    return n + sum(layer_parameters(config, ls) for ls in config.layers)


def memory_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, batch: int = 1, context: int = 4096) -> int:
    """Weights + KV cache + conv state in ``dtype``, SSM state in fp32, at a batch size and context length."""
    b = DTYPE_BYTES[dtype]
    total = count_parameters(config) * b
    for ls in config.layers:
        if ls.kind == "attention":
            total += 2 * batch * context * ls.kv_heads * ls.head_dim * b
        elif ls.kind == "mamba":
            total += batch * (ls.heads * ls.head_dim + 2 * ls.groups * ls.d_state) * (config.mamba_conv_kernel - 1) * b
            total += batch * ls.heads * ls.head_dim * ls.d_state * 4
    return total


# --------------------------------------------------------------------------- budget targets
@dataclass(frozen=True)
class Target:
    """A budget target: a fraction of the parent's parameters, a parameter count, or a memory size."""

    kind: str  # "fraction" | "params" | "memory"
    value: float

    def params(self, config: ModelConfig) -> float:
        """Target parameter count (fraction and params targets)."""
        if self.kind == "fraction":
            return self.value * count_parameters(config)
        if self.kind == "params":
            return self.value
        raise ValueError("a memory target has no parameter count; use bytes()")

    def __str__(self) -> str:
        if self.kind == "fraction":
            return f"{self.value:g} of the parent's parameters"
        if self.kind == "params":
            return f"{self.value:.4g} parameters"
        return f"{self.value / 2**30:.3g} GiB"


_MEM = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*(k|m|g|t)(i?)b\s*$", re.IGNORECASE)


def parse_target(value: str | float | int) -> Target:
    """``0.5`` -> fraction, ``6e9`` -> params, ``12GB`` / ``12GiB`` -> memory bytes."""
    if isinstance(value, str):
        m = _MEM.match(value)
        if m:
            num, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
            scale = (1024 if binary else 1000) ** "kmgt".index(unit) * (1024 if binary else 1000)
            return Target("memory", num * scale)
        try:
            value = float(value)
        except ValueError:
            raise ArchError(
                f"budget target {value!r} is not a fraction (0.5), a parameter count (6e9) or a memory size (12GB)"
            ) from None
    value = float(value)
    if value <= 0:
        raise ArchError(f"budget target {value:g} must be positive")
    if value <= 1:
        return Target("fraction", value)
    return Target("params", value)
