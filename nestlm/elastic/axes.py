"""The elastic axes: what each one cuts, and the choice lists a recipe's ``elastic.axes`` resolve to."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig, check_moe_experts
from .targets import ArchError

AXES = ("hidden", "mamba_heads", "attn_heads", "mlp", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth")
AXIS_KIND = {
    "mamba_heads": "mamba",
    "attn_heads": "attention",
    "mlp": "mlp",
    "moe_experts": "moe",
    "moe_ffn": "moe",
    "moe_shared_ffn": "moe",
}
# the LayerSpec field each width axis sets
AXIS_FIELD = {
    "mamba_heads": "heads",
    "attn_heads": "heads",
    "mlp": "ffn",
    "moe_experts": "experts",
    "moe_ffn": "ffn",
    "moe_shared_ffn": "shared_ffn",
}


WIDTH_MULTIPLE = 8
"""Default multiple of the channel widths (hidden, MLP, expert and shared-expert widths) that pruning,
the routers' axes and freezing choose: transformers' grouped_mm experts need rows of 16 bytes (8 bf16
values, 4 fp32), and tensor-core GEMMs run fastest at multiples of 8 or more (Model Optimizer rounds
pruned widths the same way). 1 allows any width."""


def width_step(full: int, multiple: int) -> int:
    """The step of a channel width's choices: ``multiple``, or 1 when the parent's width is not above it."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ArchError(f"width_multiple must be a positive int, got {multiple!r}")
    return multiple if full > multiple else 1


CHANNEL_AXES = ("hidden", "mlp", "moe_ffn", "moe_shared_ffn")  # widths in channels: kept to width_multiple


def resolve_choices(
    config: ModelConfig,
    axes: dict[str, list[float | int]],
    n_layers_droppable: int | None = None,
    width_multiple: int = WIDTH_MULTIPLE,
) -> dict[str, list[int]]:
    """Absolute, validated, descending choice lists per axis from sizes or fractions (<= 1.0).

    hidden: channels; mamba_heads: heads per layer (a multiple of the groups); attn_heads:
    query heads (a multiple of the KV heads); mlp: neurons; moe_experts: routed experts per MoE
    layer (the same number in every group, routable by the parent's top-k); moe_ffn: every expert's
    neurons; moe_shared_ffn: the shared expert's; depth: layers dropped (0 = none).
    Channel widths (hidden, mlp, moe_ffn, moe_shared_ffn) below the parent's are multiples of
    ``width_multiple`` (see arch.WIDTH_MULTIPLE): a fraction rounds to one, a count must be one.
    The full size is always a choice (the first).
    """

    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ArchError(f"unknown elastic axis {unknown[0]!r}; valid axes: {', '.join(AXES)}")
    kinds = {k: [ls for ls in config.layers if ls.kind == k] for k in ("mamba", "attention", "mlp", "moe")}
    out: dict[str, list[int]] = {}
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ArchError(f"elastic axis {axis!r} needs a non-empty list of sizes or fractions, got {values!r}")
        if axis == "depth":
            vals = [int(v) for v in values]
            bad = [v for v in vals if not 0 <= v < config.n_layers]
            if bad:
                raise ArchError(f"depth choice {bad[0]} must drop between 0 and {config.n_layers - 1} layers")
            out[axis] = sorted(set(vals) | {0})
            continue
        if axis == "hidden":
            full, mult, name = config.hidden_size, 1, "hidden"
        else:
            layers = kinds[AXIS_KIND[axis]]
            if not layers:
                raise ArchError(f"elastic axis {axis!r} has no {AXIS_KIND[axis]} layer to act on")
            if len({(ls.heads, ls.groups, ls.kv_heads, ls.ffn, ls.experts, ls.shared_ffn) for ls in layers}) > 1:
                raise ArchError(f"elastic axis {axis!r} needs the parent's {AXIS_KIND[axis]} layers to share widths")
            ls = layers[0]
            full, mult, name = {
                "mamba_heads": (ls.heads, ls.groups, "Mamba groups"),
                "attn_heads": (ls.heads, ls.kv_heads, "KV heads"),
                "mlp": (ls.ffn, 1, "neurons"),
                "moe_experts": (ls.experts, config.moe_n_group, "expert groups"),
                "moe_ffn": (ls.ffn, 1, "neurons"),
                "moe_shared_ffn": (ls.shared_ffn, 1, "neurons"),
            }[axis]
        if axis in CHANNEL_AXES:
            mult, name = width_step(full, width_multiple), "(elastic.width_multiple)"
        vals = []
        for v in values:
            n = min(round(v * full / mult) * mult, full) if isinstance(v, float) and v <= 1.0 else int(v)
            if n == full:
                pass
            elif n <= 0 or n > full:
                raise ArchError(f"{axis} choice {v!r} gives {n}, outside 1..{full}")
            elif n % mult and axis in CHANNEL_AXES:
                raise ArchError(
                    f"{axis} choice {v!r} gives {n}, not a multiple of {mult} {name}: give a multiple, or set "
                    "elastic.width_multiple: 1 to allow any width"
                )
            elif n % mult:
                raise ArchError(
                    f"{axis} choice {v!r} gives {n}, not a multiple of the {mult} {name} (every group keeps the "
                    "same number of heads)"
                )
            if axis == "moe_experts":
                try:
                    check_moe_experts(config, n)
                except ConfigError as e:
                    raise ArchError(f"moe_experts choice {v!r}: {e}") from None
            vals.append(n)
        out[axis] = sorted(set(vals) | {full}, reverse=True)
    return out
