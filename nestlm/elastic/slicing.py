"""Slicing rules: ArchSpec -> a standalone, physically smaller HybridLM.

Each parameter of a kept layer is the parent's parameter indexed, dimension by
dimension, by the channels the sub-network keeps. These rules mirror the views that
``HybridLM.forward(arch=...)`` takes; the tests hold the two equal (logits within
1e-5) and hold the sliced parameter count equal to ``ArchSpec.num_parameters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import LayerSpec
from .arch import ArchSpec
from .index import as_index, expert_index, query_channels
from .index import head_channels as _head_channels

if TYPE_CHECKING:
    from ..model import HybridLM

Sel = torch.Tensor  # 1-D index of kept channels along one dimension


def _prefix(n: int) -> Sel:
    return torch.arange(n)


def head_channels(n_heads: int, full_dim: int, dim: int) -> Sel:
    """Channels of the first ``n_heads`` heads of width ``full_dim``, keeping ``dim`` of each."""
    return as_index(_head_channels(n_heads, full_dim, dim))


def layer_rules(
    parent: LayerSpec, active: LayerSpec, hidden: int, n_group: int = 1
) -> dict[str, tuple[Sel | None, ...]]:
    """For each parameter of the block (relative name): the kept index per dimension (None = all).

    ``n_group``: the MoE routing groups (a nested MoE layer keeps the first experts of each)."""
    D = _prefix(hidden)
    rules: dict[str, tuple[Sel | None, ...]] = {"norm.weight": (D,)}
    if parent.kind == "mamba":
        HP, bc = parent.heads * parent.head_dim, 2 * parent.groups * parent.d_state
        ch = head_channels(active.heads, parent.head_dim, active.head_dim)
        bcr = torch.arange(bc)
        # in_proj order: [z, x, B, C, dt]
        rows = torch.cat([ch, HP + ch, 2 * HP + bcr, 2 * HP + bc + _prefix(active.heads)])
        rules |= {
            "mixer.in_proj.weight": (rows, D),
            "mixer.in_proj.bias": (rows,),
            "mixer.conv1d.weight": (torch.cat([ch, HP + bcr]), None, None),
            "mixer.conv1d.bias": (torch.cat([ch, HP + bcr]),),
            "mixer.dt_bias": (_prefix(active.heads),),
            "mixer.A_log": (_prefix(active.heads),),
            "mixer.D": (_prefix(active.heads),),
            "mixer.norm.weight": (ch,),
            "mixer.out_proj.weight": (D, ch),
            "mixer.out_proj.bias": (D,),
        }
    elif parent.kind == "attention":
        q = as_index(query_channels(parent.kv_heads, parent.head_dim, active.heads, active.kv_heads))
        kv = _prefix(active.kv_heads * parent.head_dim)
        rules |= {
            "mixer.q_proj.weight": (q, D),
            "mixer.q_proj.bias": (q,),
            "mixer.k_proj.weight": (kv, D),
            "mixer.k_proj.bias": (kv,),
            "mixer.v_proj.weight": (kv, D),
            "mixer.v_proj.bias": (kv,),
            "mixer.o_proj.weight": (D, q),
            "mixer.o_proj.bias": (D,),
            # q/k norms act on one head's channels, which are never sliced (head_dim is not elastic)
            "mixer.q_norm.weight": (None,),
            "mixer.k_norm.weight": (None,),
        }
    elif parent.kind == "moe":
        E = as_index(expert_index(parent.experts, n_group, active.experts))
        F, S = _prefix(active.ffn), _prefix(active.shared_ffn)
        rules |= {
            "mixer.gate.weight": (E, D),
            "mixer.gate.e_score_correction_bias": (E,),
            "mixer.experts.up_proj": (E, F, D),
            "mixer.experts.down_proj": (E, D, F),
            "mixer.shared_experts.up_proj.weight": (S, D),
            "mixer.shared_experts.up_proj.bias": (S,),
            "mixer.shared_experts.down_proj.weight": (D, S),
            "mixer.shared_experts.down_proj.bias": (D,),
        }
    else:
        F = _prefix(active.ffn)
        for name in ("up_proj", "gate_proj"):
            rules |= {f"mixer.{name}.weight": (F, D), f"mixer.{name}.bias": (F,)}
        rules |= {"mixer.down_proj.weight": (D, F), "mixer.down_proj.bias": (D,)}
    return rules


def _index(t: torch.Tensor, sels: tuple[Sel | None, ...]) -> torch.Tensor:
    for dim, sel in enumerate(sels):
        if sel is not None and not (len(sel) == t.shape[dim] and bool((sel == torch.arange(t.shape[dim])).all())):
            t = t.index_select(dim, sel.to(t.device))
    return t.clone()


@torch.no_grad()
def slice_model(model: HybridLM, spec: ArchSpec) -> HybridLM:
    """A standalone HybridLM holding exactly the weights that ``spec`` keeps."""
    cfg = model.config
    spec.validate(cfg)
    small_cfg = spec.to_config(cfg)
    with torch.device("meta"):
        small = type(model)(small_cfg)
    parent_sd = model.state_dict()
    D = _prefix(spec.hidden)
    sd: dict[str, torch.Tensor] = {
        "embeddings.weight": _index(parent_sd["embeddings.weight"], (None, D)),
        "norm_f.weight": _index(parent_sd["norm_f.weight"], (D,)),
    }
    if "lm_head.weight" in parent_sd:
        sd["lm_head.weight"] = _index(parent_sd["lm_head.weight"], (None, D))
    j = 0
    for i, (p, a) in enumerate(zip(cfg.layers, spec.layers, strict=True)):
        if a is None:
            continue
        for name, sels in layer_rules(p, a, spec.hidden, cfg.moe_n_group).items():
            key = f"layers.{i}.{name}"
            if key in parent_sd:
                sd[f"layers.{j}.{name}"] = _index(parent_sd[key], sels)
        j += 1
    small.load_state_dict(sd, assign=True, strict=True)
    small.source_dir = model.source_dir
    return small.to(model.embeddings.weight.device)
