"""Which channels and heads of the full weights a nested layer keeps: one helper for both users.

``HybridLM.forward(arch=...)`` takes these as views (an int is a prefix) or gathers (an
index tensor); ``elastic.slicing`` copies the same rows into a standalone model. Both call
these functions, so the nested forward and the sliced model cannot drift apart.
"""

from __future__ import annotations

import torch


def head_channels(n_heads: int, full_dim: int, dim: int) -> int | torch.Tensor:
    """Channels of the first ``n_heads`` heads of width ``full_dim``, keeping the first ``dim`` of each.

    An int (a prefix of ``n_heads * full_dim`` channels) when every head keeps its full width.
    """
    if dim == full_dim:
        return n_heads * full_dim
    return (torch.arange(n_heads)[:, None] * full_dim + torch.arange(dim)[None]).reshape(-1)


def query_heads(full_kv: int, heads: int, kv_heads: int) -> torch.Tensor:
    """Parent query heads kept, in the slice's rank-major order.

    Query head j reads KV head j % kv; a slice with ``kv_heads`` KV heads and ``heads`` query heads
    keeps slice head r * kv_heads + g = parent head r * full_kv + g.
    """
    r = torch.arange(heads // kv_heads)[:, None]
    g = torch.arange(kv_heads)[None]
    return (r * full_kv + g).reshape(-1)


def query_channels(full_kv: int, head_dim: int, heads: int, kv_heads: int) -> int | torch.Tensor:
    """q_proj rows (o_proj columns) of the kept query heads: a prefix when every KV head is kept."""
    if kv_heads == full_kv:  # query heads [0, heads): a prefix (rank-major within KV groups)
        return heads * head_dim
    h = query_heads(full_kv, heads, kv_heads)
    return (h[:, None] * head_dim + torch.arange(head_dim)[None]).reshape(-1)


def expert_index(n_experts: int, n_group: int, kept: int) -> int | torch.Tensor:
    """Routed experts a nested MoE layer keeps: the first ``kept / n_group`` of every group.

    Experts are group-major (group g holds [g*E/G, (g+1)*E/G)) and ranked within their group, so
    with one group this is a prefix (an int).
    """
    if n_group == 1 or kept == n_experts:
        return kept
    per, full = kept // n_group, n_experts // n_group
    return (torch.arange(n_group)[:, None] * full + torch.arange(per)[None]).reshape(-1)


def as_index(sel: int | torch.Tensor) -> torch.Tensor:
    """An index tensor for a prefix length or an index tensor."""
    return torch.arange(sel) if isinstance(sel, int) else sel
