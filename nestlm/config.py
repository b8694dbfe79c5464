"""Model configuration: a global hidden size plus one LayerSpec per layer.

The per-layer list is the truth. A Nemotron-H pattern string such as ``"M-M*-"`` is
only sugar, parsed by :meth:`ModelConfig.from_pattern` into LayerSpecs; widths may
differ from layer to layer (that is what a heterogeneous elastic slice produces).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import NestlmError

KINDS = ("mamba", "attention", "mlp", "moe")
PATTERN_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
KIND_TO_CHAR = {v: k for k, v in PATTERN_CHARS.items()}
MLP_ACTS = ("relu2", "swiglu")


class ConfigError(NestlmError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(valid)}")


@dataclass
class LayerSpec:
    """One layer of the stack: a pre-norm block with exactly one mixer.

    kind="mamba":     heads, head_dim, groups, d_state   (Mamba2 SSD mixer)
    kind="attention": heads, kv_heads, head_dim          (GQA attention)
    kind="mlp":       ffn                                (MLP width)
    kind="moe":       experts, ffn, shared_ffn           (routed experts, expert width, shared-expert width)
    Fields that do not belong to the kind stay None. How a MoE layer routes (top-k, groups,
    scaling) is the same in every layer and lives in ModelConfig (``moe_*``).
    """

    kind: str
    heads: int | None = None
    head_dim: int | None = None
    groups: int | None = None
    d_state: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    experts: int | None = None
    shared_ffn: int | None = None

    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "mamba": ("heads", "head_dim", "groups", "d_state"),
        "attention": ("heads", "kv_heads", "head_dim"),
        "mlp": ("ffn",),
        "moe": ("experts", "ffn", "shared_ffn"),
    }

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"layer kind {self.kind!r} is not one of {', '.join(KINDS)}")
        needed = self.FIELDS[self.kind]
        for name in ("heads", "head_dim", "groups", "d_state", "kv_heads", "ffn", "experts", "shared_ffn"):
            value = getattr(self, name)
            if name in needed:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{self.kind} layer needs a positive int {name!r}, got {value!r}")
            elif value is not None:
                raise ConfigError(f"{self.kind} layer takes no {name!r} (it takes {', '.join(needed)})")
        if self.kind == "mamba" and self.heads % self.groups:
            raise ConfigError(f"mamba heads ({self.heads}) must be a multiple of groups ({self.groups})")
        if self.kind == "attention" and self.heads % self.kv_heads:
            raise ConfigError(f"attention heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def char(self) -> str:
        return KIND_TO_CHAR[self.kind]

    def to_dict(self) -> dict[str, Any]:
        # the kind's fields in declaration order (not dataclasses.asdict: its deep copy is the cost of
        # searching thousands of ArchSpecs); the other fields are None by __post_init__
        return {"kind": self.kind, **{k: getattr(self, k) for k in _ORDERED[self.kind]}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"a layer spec must be a JSON object with 'kind', got {data!r}")
        _check_keys(cls, data, "layer spec")
        if "kind" not in data:
            raise ConfigError(f"layer spec {data!r} has no 'kind' (one of {', '.join(KINDS)})")
        return cls(**data)


_ORDERED = {
    kind: tuple(f.name for f in dataclasses.fields(LayerSpec) if f.name in names)
    for kind, names in LayerSpec.FIELDS.items()
}


@dataclass
class ModelConfig:
    """Configuration of a hybrid Mamba-Attention-MLP language model (Nemotron-H family)."""

    vocab_size: int
    hidden_size: int
    layers: list[LayerSpec]
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    mlp_act: str = "relu2"  # "relu2" (squared ReLU, Nemotron-H) or "swiglu"
    mlp_bias: bool = False
    attention_bias: bool = False  # biases on q, k, v (and o, unless attention_out_bias says otherwise)
    attention_out_bias: bool | None = None  # o_proj bias; None: same as attention_bias (Qwen2: qkv only)
    attention_qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    rope_theta: float | None = None  # None: no positional embedding (Nemotron-H)
    # RoPE frequency scaling: None, or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama 3.x)
    rope_scaling: dict[str, Any] | None = None
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # bias of in_proj and out_proj
    mamba_dt_min: float = 1e-3  # init range of dt: [mamba_dt_min, mamba_dt_init_max] (only used at random init)
    mamba_dt_init_max: float = 0.1
    # dt = softplus(dt + dt_bias) is clamped to [lo, hi], in the scan and the one-token step alike, as
    # mamba_ssm's dt_limit and NemotronH's time_step_limit do; (0, inf) is no clamp (their default).
    # A config written before this key existed clamped at [mamba_dt_min, inf): from_dict keeps that.
    mamba_dt_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])
    residual_in_fp32: bool = False
    # MoE routing (NemotronH): sigmoid scores, top-k among the experts of the best topk_group of
    # n_group groups (a group scores the sum of its top 2), weights renormalised and scaled
    moe_top_k: int = 2
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_norm_topk_prob: bool = True
    moe_routed_scaling_factor: float = 1.0
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The untouched Hugging Face config.json this model came from (if any), so that
    # export writes back every value it does not own, bit for bit.
    hf_config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)):
            raise ConfigError(f"layers must be a list of layer specs, got {self.layers!r}")
        for i, ls in enumerate(self.layers):
            if not isinstance(ls, (LayerSpec, dict)):
                raise ConfigError(f"layers[{i}] must be a layer spec (a dict with 'kind' and its widths), got {ls!r}")
        self.layers = [ls if isinstance(ls, LayerSpec) else LayerSpec.from_dict(ls) for ls in self.layers]
        for name in ("vocab_size", "hidden_size", "mamba_conv_kernel", "mamba_chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        self._check_types()
        if not self.layers:
            raise ConfigError("a model needs at least one layer")
        if self.mlp_act not in MLP_ACTS:
            raise ConfigError(f"mlp_act {self.mlp_act!r} is not one of {', '.join(MLP_ACTS)}")
        for ls in self.layers:
            if ls.kind == "attention" and self.rope_theta is not None and ls.head_dim % 2:
                raise ConfigError("RoPE needs an even attention head_dim")
        for name in ("moe_top_k", "moe_n_group", "moe_topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.moe_topk_group > self.moe_n_group:
            raise ConfigError(f"moe_topk_group ({self.moe_topk_group}) exceeds moe_n_group ({self.moe_n_group})")
        for ls in self.layers:
            if ls.kind == "moe":
                check_moe_experts(self, ls.experts)

    _BOOLS: ClassVar[tuple[str, ...]] = (
        "tie_embeddings",
        "mlp_bias",
        "attention_bias",
        "attention_qk_norm",
        "mamba_conv_bias",
        "mamba_proj_bias",
        "residual_in_fp32",
        "moe_norm_topk_prob",
    )
    _NUMBERS: ClassVar[tuple[str, ...]] = (
        "norm_eps",
        "mamba_dt_min",
        "mamba_dt_init_max",
        "init_std",
        "moe_routed_scaling_factor",
    )

    def _check_types(self) -> None:
        """A value of the wrong type is an error naming the key (not a crash deep in forward)."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in self._BOOLS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{name} must be true or false, got {v!r}")
        for name in self._NUMBERS:
            v = getattr(self, name)
            if not is_number(v):
                raise ConfigError(f"{name} must be a number, got {v!r}")
        if self.rope_theta is not None and not is_number(self.rope_theta):
            raise ConfigError(f"rope_theta must be a number or null, got {self.rope_theta!r}")
        if self.attention_out_bias is not None and not isinstance(self.attention_out_bias, bool):
            raise ConfigError(f"attention_out_bias must be true, false or null, got {self.attention_out_bias!r}")
        rs = self.rope_scaling
        if rs is not None:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if not isinstance(rs, dict) or rs.get("rope_type") != "llama3":
                raise ConfigError(f"rope_scaling must be null or a llama3 scaling dict (rope_type: llama3), got {rs!r}")
            for k in keys:
                if not is_number(rs.get(k)):
                    raise ConfigError(f"rope_scaling needs a number {k!r} (llama3 scaling: {', '.join(keys)})")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and not is_int(v):
                raise ConfigError(f"{name} must be an int or null, got {v!r}")
        eos = self.eos_token_id
        if isinstance(eos, tuple):
            self.eos_token_id = eos = list(eos)
        if not (eos is None or is_int(eos) or (isinstance(eos, list) and all(is_int(e) for e in eos))):
            raise ConfigError(f"eos_token_id must be an int, a list of ints or null, got {eos!r}")
        lim = self.mamba_dt_limit
        if isinstance(lim, tuple):
            self.mamba_dt_limit = lim = list(lim)
        if not (isinstance(lim, list) and len(lim) == 2 and all(is_number(v) for v in lim) and 0 <= lim[0] < lim[1]):
            raise ConfigError(f"mamba_dt_limit must be [lo, hi] with 0 <= lo < hi (hi may be Infinity), got {lim!r}")
        self.mamba_dt_limit = [float(v) for v in lim]
        if self.hf_config is not None and not isinstance(self.hf_config, dict):
            raise ConfigError(f"hf_config must be a dict (a config.json) or null, got {type(self.hf_config).__name__}")

    # ------------------------------------------------------------------ sugar
    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def pattern(self) -> str:
        return "".join(ls.char for ls in self.layers)

    @classmethod
    def from_pattern(
        cls,
        pattern: str,
        *,
        vocab_size: int,
        hidden_size: int,
        mamba_heads: int = 8,
        mamba_head_dim: int = 64,
        mamba_groups: int = 1,
        d_state: int = 128,
        attn_heads: int = 8,
        kv_heads: int = 8,
        attn_head_dim: int = 64,
        ffn: int = 1024,
        experts: int = 8,
        expert_ffn: int = 256,
        shared_ffn: int = 256,
        **kwargs: Any,
    ) -> ModelConfig:
        """Build a homogeneous config from a pattern string such as ``"M-M*-"``."""
        layers = []
        for i, ch in enumerate(pattern):
            kind = PATTERN_CHARS.get(ch)
            if kind is None:
                raise ConfigError(
                    f"pattern character {ch!r} at position {i} is not one of "
                    f"{', '.join(repr(c) for c in PATTERN_CHARS)} (M=Mamba2, *=attention, -=MLP, E=MoE)"
                )
            if kind == "mamba":
                layers.append(
                    LayerSpec("mamba", heads=mamba_heads, head_dim=mamba_head_dim, groups=mamba_groups, d_state=d_state)
                )
            elif kind == "attention":
                layers.append(LayerSpec("attention", heads=attn_heads, kv_heads=kv_heads, head_dim=attn_head_dim))
            elif kind == "moe":
                layers.append(LayerSpec("moe", experts=experts, ffn=expert_ffn, shared_ffn=shared_ffn))
            else:
                layers.append(LayerSpec("mlp", ffn=ffn))
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, **kwargs)

    # ------------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "layers":
                v = [ls.to_dict() for ls in v]
            elif f.name == "mamba_dt_limit":
                v = [encode_float(x) for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        _check_keys(cls, data, "model config")
        data = dict(data)
        if "layers" not in data:
            raise ConfigError("model config has no 'layers'")
        if isinstance(data["layers"], list):
            data["layers"] = [LayerSpec.from_dict(ls) if isinstance(ls, dict) else ls for ls in data["layers"]]
        if "mamba_dt_limit" not in data:  # written before the key existed: dt was clamped at mamba_dt_min
            data["mamba_dt_limit"] = [data.get("mamba_dt_min", cls.mamba_dt_min), math.inf]
        elif isinstance(data["mamba_dt_limit"], list):
            data["mamba_dt_limit"] = [decode_float(x) for x in data["mamba_dt_limit"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text, parse_constant=_parse_constant))


def check_moe_experts(config: ModelConfig, experts: int) -> None:
    """Routing needs every group to hold the same number of experts, at least 2 (a group scores its top 2),
    and top-k no larger than the experts of the topk_group groups it may choose from."""
    G, k = config.moe_n_group, config.moe_top_k
    if experts % G or experts // G < 2:
        raise ConfigError(
            f"{experts} routed experts do not split into moe_n_group={G} groups of at least 2 experts each"
        )
    if k > config.moe_topk_group * experts // G:
        raise ConfigError(
            f"moe_top_k={k} exceeds the {config.moe_topk_group * experts // G} experts that "
            f"moe_topk_group={config.moe_topk_group} of {G} groups of {experts // G} hold"
        )


_FLOAT_TAG = "__float__"  # transformers' JSON form of inf and nan ({"__float__": "Infinity"}), valid JSON


def encode_float(v: float) -> float | dict[str, str]:
    """A float as strict JSON can hold it: inf / -inf / nan as transformers' tagged objects."""
    if math.isnan(v):
        return {_FLOAT_TAG: "NaN"}
    if math.isinf(v):
        return {_FLOAT_TAG: "Infinity" if v > 0 else "-Infinity"}
    return v


def decode_float(v: Any) -> Any:
    """The inverse of encode_float; other values pass through unchanged."""
    if isinstance(v, dict) and set(v) == {_FLOAT_TAG} and v[_FLOAT_TAG] in ("Infinity", "-Infinity", "NaN"):
        return _parse_constant(v[_FLOAT_TAG])
    return v


def _json_default(o: Any) -> Any:
    raise TypeError(f"cannot serialise {type(o).__name__} in a model config")


def _parse_constant(name: str) -> float:
    return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}[name]
