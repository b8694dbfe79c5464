"""The hybrid Mamba2 / attention / MLP language model, in one file.

Read top to bottom: norms, the Mamba2 mixer, attention, the MLP, the pre-norm block,
and HybridLM, which stacks blocks as its ModelConfig lists them.

Elasticity lives here only as *views*: ``forward(ids, arch=spec)`` runs the nested
sub-network that ``spec`` describes (global hidden size, per-layer active widths or
a dropped layer) by slicing prefixes of the full weights. Weights are stored in an
order that makes every such sub-network a prefix:
  * Mamba heads rank-major within groups: head j reads group j % G, so keeping
    k heads per group keeps heads [0, k*G);
  * attention query heads rank-major within KV groups: query head j reads KV head
    j % n_kv, so keeping k per KV group keeps heads [0, k*n_kv);
  * hidden channels, MLP neurons and head channels in importance order (after
    ``nestlm.reorder``) so that the most important come first.
Two rarer choices (a Mamba head_dim below the full one; fewer KV heads together with
fewer query heads per KV group) are not prefixes; they gather the rows they need. Which
rows, ``nestlm.elastic.index`` says, for this forward and for slicing alike.

Training reaches inside the forward through one object, a ``Tap`` (``forward(tap=...)``):
importance estimation reads named activations, router training replaces them with soft
masks and multiplies block outputs by straight-through gates. A Tap is passed down to
the blocks explicitly rather than installed as forward hooks or a wrapper (DESIGN.md rules
both out): the path is visible in the code, costs nothing when ``tap`` is None (inference),
and keeps inference's forward signature free of training arguments. Context parallelism reaches in
the same way: ``forward(part, context=...)`` runs one contiguous part of every sequence, and the
Mamba and attention mixers ask the ``SequencePart`` (cache.py) for what the earlier parts hold (the
conv's last inputs, the SSM state, keys and values), as a decode asks its cache; the communication
lives in train/context_parallel.py, never here.

Imports run one way: this file imports config, cache, ssd and the index helpers only; the
thin conveniences at the bottom (generate, save_pretrained, slice) call modules that never
import this one back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.bias import causal_lower_right

from .cache import AttentionState, InferenceCache, MambaState, SequencePart
from .config import LayerSpec, ModelConfig
from .elastic.index import expert_index, head_channels, query_channels
from .errors import UnknownBudgetError
from .ssd import causal_conv1d, ssd_scan, ssd_step
from .ssd_steps import ssd_steps
from .tap import Tap

if TYPE_CHECKING:
    from .checkpoint import Budget
    from .elastic.arch import ArchSpec
    from .elastic.importance import Importance


# What a mixer sees of the Tap: its block's ``activation`` with the layer bound.
Probe = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class ModelOutput:
    """What HybridLM.forward returns."""

    logits: torch.Tensor | None  # (B, L, vocab), fp32; None for forward(..., head=False)
    cache: InferenceCache | None = None
    hidden_states: torch.Tensor | None = None  # final normed hidden states, if asked for


def _take(w: torch.Tensor, dim: int, sel: int | torch.Tensor) -> torch.Tensor:
    """A prefix view (``sel`` an int) or a gather (``sel`` an index tensor) along ``dim``."""
    if isinstance(sel, int):
        return w if sel == w.shape[dim] else w.narrow(dim, 0, sel)
    return w.index_select(dim, sel.to(w.device))


# --------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 with the weight applied in fp32 (as Nemotron-H does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, dim: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if dim is None else self.weight[:dim]
        xf = x.float()
        if mask is not None:  # soft router masks: normalise over the kept share of the channels, as slicing does
            m = mask.float()
            xf = xf * m
            return (w.float() * xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / m.sum() + self.eps)).to(x.dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (w.float() * xf).to(x.dtype)


def gated_group_rmsnorm(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    head_dim: int,
    eps: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """norm(y * silu(z)) per Mamba group, then * weight. y, z: (B, L, H*P) in rank-major head order.

    Group g holds heads g, g+G, g+2G, ...: view channels as (r, g, p) and normalise over r and p.
    ``mask`` (H*P,): soft router masks; masked channels leave the mean, as slicing the heads does.
    """
    B, L, C = y.shape
    h = y.float() * F.silu(z.float())
    if mask is not None:
        h = h * mask.float()
    h = h.view(B, L, C // (groups * head_dim), groups, head_dim)  # (B, L, r, g, p)
    # mean of squares over (r, p) as a norm: one pass, no squared copy to keep for backward
    ms = torch.linalg.vector_norm(h, dim=(2, 4), keepdim=True).square()
    if mask is None:
        ms = ms / (C // groups)
    else:  # the kept share of each group's channels
        ms = ms / mask.float().view(-1, groups, head_dim).sum(dim=(0, 2)).view(1, 1, 1, groups, 1)
    h = h * torch.rsqrt(ms + eps)
    return weight * h.view(B, L, C).to(y.dtype)


# --------------------------------------------------------------------------- mixers
class Mamba2Mixer(nn.Module):
    """Mamba2 (SSD) mixer: in_proj -> causal conv over xBC -> SSD scan -> gated norm -> out_proj."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.H, self.P, self.G, self.N = spec.heads, spec.head_dim, spec.groups, spec.d_state
        self.K = cfg.mamba_conv_kernel
        self.chunk_size = cfg.mamba_chunk_size
        self.dt_limit = tuple(cfg.mamba_dt_limit)  # (lo, hi); (0, inf): no clamp
        self.eps = cfg.norm_eps
        self.d_inner = self.H * self.P
        self.d_bc = 2 * self.G * self.N
        # in_proj order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * self.d_inner + self.d_bc + self.H, bias=cfg.mamba_proj_bias)
        # depthwise causal conv over [x, B, C]
        self.conv1d = nn.Conv1d(
            self.d_inner + self.d_bc,
            self.d_inner + self.d_bc,
            self.K,
            groups=self.d_inner + self.d_bc,
            padding=self.K - 1,
            bias=cfg.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.H))
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps)  # weight of the gated group norm
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)

    def forward(
        self,
        u: torch.Tensor,
        active: LayerSpec | None = None,
        hidden: int | None = None,
        state: MambaState | None = None,
        pad_mask: torch.Tensor | None = None,
        decode: bool = False,
        probe: Probe | None = None,
        keep_steps: bool = False,
        seq_idx: torch.Tensor | None = None,
        context: SequencePart | None = None,
    ) -> tuple[torch.Tensor, MambaState | None]:
        # seq_idx (B, L): packed documents; the conv and the SSM state restart from zero at each one
        Bsz, L, D = u.shape  # (B, L, hidden)
        H = self.H if active is None else active.heads
        P = self.P if active is None else active.head_dim
        G, N = self.G, self.N
        HP = H * P
        ch = head_channels(H, self.P, P)  # active x (and z) channels within the full d_inner
        W = _take(self.in_proj.weight, 1, D)  # (rows, D)
        bias = self.in_proj.bias
        xbc_in = None
        if H == self.H and P == self.P:  # one GEMM, then split
            zxbcdt = F.linear(u, W, bias)
            z, xbc_full, dt = zxbcdt.split([self.d_inner, self.d_inner + self.d_bc, self.H], dim=-1)
            x, bc = xbc_full.split([self.d_inner, self.d_bc], dim=-1)
            if pad_mask is None and probe is None:  # [x, B, C] is already one slice: no concat
                xbc_in = xbc_full.transpose(1, 2)  # (B, HP + d_bc, L)
        else:  # the same rows, one segment at a time (views of the full weight)
            seg = [0, self.d_inner, 2 * self.d_inner, 2 * self.d_inner + self.d_bc]

            def proj(start: int, sel: int | torch.Tensor) -> torch.Tensor:
                w = _take(W[start:], 0, sel)
                b = None if bias is None else _take(bias[start:], 0, sel)
                return F.linear(u, w, b)

            z, x, bc, dt = proj(seg[0], ch), proj(seg[1], ch), proj(seg[2], self.d_bc), proj(seg[3], H)
        if pad_mask is not None:  # padding must not enter the conv window or the state
            x, bc = x * pad_mask[..., None], bc * pad_mask[..., None]
        if probe is not None:
            x = probe("mamba_x", x)  # (B, L, H*P): the x part of in_proj's output

        # causal conv over [x, B, C]; x channels and B/C channels are separate slices of one conv
        cw = self.conv1d.weight[:, 0]  # (d_inner + d_bc, K)
        cb = self.conv1d.bias
        if xbc_in is None:
            xbc_in = torch.cat([x, bc], dim=-1).transpose(1, 2)  # (B, HP + d_bc, L)
        if isinstance(ch, int) and ch == self.d_inner:
            w_conv, b_conv = cw, cb
        else:
            idx = torch.cat(
                [torch.arange(self.d_inner)[:HP] if isinstance(ch, int) else ch, self.d_inner + torch.arange(self.d_bc)]
            )
            w_conv = cw.index_select(0, idx.to(cw.device))
            b_conv = None if cb is None else cb.index_select(0, idx.to(cw.device))
        history = state.conv if state is not None else None
        if context is not None:  # context parallelism: the previous part's last K-1 inputs
            history = context.conv_history(xbc_in, self.K - 1, seq_idx)
        xbc = causal_conv1d(xbc_in, w_conv, b_conv, history, seq_idx)  # (B, HP + d_bc, L)
        new_conv = None
        if state is not None or decode:
            full = (
                xbc_in if history is None or L >= self.K - 1 else torch.cat([history.to(xbc_in.dtype), xbc_in], dim=-1)
            )
            if full.shape[-1] < self.K - 1:
                full = F.pad(full, (self.K - 1 - full.shape[-1], 0))
            new_conv = full[..., -(self.K - 1) :].contiguous()
        xbc = xbc.transpose(1, 2)  # (B, L, HP + d_bc)
        if pad_mask is not None:
            xbc = xbc * pad_mask[..., None]
        x, Bm, Cm = xbc.split([HP, G * N, G * N], dim=-1)

        A = -torch.exp(self.A_log[:H].float())  # (H,)
        dt = F.softplus(dt.float() + self.dt_bias[:H].float())  # (B, L, H)
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        Dskip = self.D[:H]
        steps = None
        if state is not None and keep_steps:  # speculative verify: every token's state, for exact rollback
            y, ssm_steps = ssd_steps(
                state.ssm, x.view(Bsz, L, H, P), dt, A, Bm.view(Bsz, L, G, N), Cm.view(Bsz, L, G, N), Dskip
            )
            y, ssm = y.reshape(Bsz, L, HP), ssm_steps.at(L - 1)
            hist = torch.cat([state.conv.to(xbc_in.dtype), xbc_in], dim=-1)  # (B, C, K-1+L)
            steps = (hist.unfold(-1, self.K - 1, 1)[:, :, 1:].transpose(1, 2), ssm_steps)  # conv: (B, L, C, K-1)
        elif state is not None and L == 1:  # recurrent step
            y, ssm = ssd_step(state.ssm, x.view(Bsz, H, P), dt[:, 0], A, Bm.view(Bsz, G, N), Cm.view(Bsz, G, N), Dskip)
            y = y.view(Bsz, 1, HP)
        else:
            y, ssm = ssd_scan(
                x.view(Bsz, L, H, P),  # (B, L, H, P)
                dt,
                A,
                Bm.view(Bsz, L, G, N),  # (B, L, G, N)
                Cm.view(Bsz, L, G, N),
                self.chunk_size,
                Dskip,
                None if state is None else state.ssm,
                seq_idx,
            )
            if context is not None:  # context parallelism: the scan ran from zero; add the earlier parts' state
                y = context.add_initial_state(y, ssm, dt, A, Cm.view(Bsz, L, G, N), seq_idx)
            y = y.reshape(Bsz, L, HP)
        head_mask = None
        if probe is not None:  # soft router masks on the heads (B and C are shared per group, never masked)
            ones = y.new_ones(HP)
            head_mask = probe("mamba_heads", ones)
            head_mask = None if head_mask is ones else head_mask
        y = gated_group_rmsnorm(y, z, _take(self.norm.weight, 0, ch), G, P, self.eps, head_mask)
        out_w = _take(_take(self.out_proj.weight, 0, D), 1, ch)
        out_b = None if self.out_proj.bias is None else self.out_proj.bias[:D]
        out = F.linear(y.to(u.dtype), out_w, out_b)
        new_state = MambaState(new_conv, ssm, steps) if new_conv is not None else None
        return out, new_state


@functools.lru_cache(maxsize=32)
def _inv_freq(hd: int, theta: float, scaling: tuple[tuple[str, Any], ...] | None, device: torch.device) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    if scaling is None:
        return inv
    s = dict(scaling)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(hd: int, theta: float, scaling: dict[str, Any] | None, device: Any = None) -> torch.Tensor:
    """RoPE inverse frequencies (hd/2,), with Llama 3.x scaling when ``scaling`` is given (computed once).

    llama3: wavelengths above original_len / low_freq_factor are divided by ``factor``, those
    below original_len / high_freq_factor kept, and the band between interpolated smoothly.
    """
    key = None if scaling is None else tuple(sorted(scaling.items()))
    with torch.inference_mode(False):  # a cached plain tensor, usable by training after generate
        return _inv_freq(hd, float(theta), key, torch.device(device or "cpu"))


def rope_cos_sin(
    pos: torch.Tensor, hd: int, theta: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, L, hd) for positions ``pos`` (B, L): one position per row."""
    ang = pos.float()[..., None] * rope_inv_freq(hd, theta, scaling, pos.device)  # (B, L, hd/2)
    ang = torch.cat([ang, ang], -1)[:, None]
    return ang.cos(), ang.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x: (B, H, L, hd); cos, sin: (B, 1, L, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention; optional RoPE."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.nq, self.nkv, self.hd = spec.heads, spec.kv_heads, spec.head_dim
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nq * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nq * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.attention_qk_norm:  # Qwen3: RMSNorm over each head's channels, shared by all heads
            self.q_norm = RMSNorm(self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.norm_eps)

    def forward(
        self,
        u: torch.Tensor,
        active: LayerSpec | None = None,
        hidden: int | None = None,
        state: AttentionState | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        make_state: bool = False,
        capacity: int = 0,
        probe: Probe | None = None,
        context: SequencePart | None = None,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        Bsz, L, D = u.shape
        nq = self.nq if active is None else active.heads
        nkv = self.nkv if active is None else active.kv_heads
        hd = self.hd
        qsel = query_channels(self.nkv, hd, nq, nkv)  # a prefix unless fewer KV groups are kept too

        def lin(m: nn.Linear, rows: int | torch.Tensor) -> torch.Tensor:
            w = _take(_take(m.weight, 1, D), 0, rows)
            return F.linear(u, w, None if m.bias is None else _take(m.bias, 0, rows))

        q = lin(self.q_proj, qsel).view(Bsz, L, nq, hd).transpose(1, 2)  # (B, nq, L, hd)
        k = lin(self.k_proj, nkv * hd).view(Bsz, L, nkv, hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = lin(self.v_proj, nkv * hd).view(Bsz, L, nkv, hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, hd, self.rope_theta, self.rope_scaling)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if context is not None:  # context parallelism: the keys and values of the earlier parts come first
            k, v = context.keys_values(k, v)
        if state is None and make_state:
            shape = (Bsz, nkv, max(capacity, L), hd)
            state = AttentionState(k.new_zeros(shape), v.new_zeros(shape))
        if state is not None:
            k, v = state.append(k, v)
        if nq != nkv:  # query head j reads KV head j % nkv
            k = k.repeat(1, nq // nkv, 1, 1)
            v = v.repeat(1, nq // nkv, 1, 1)
        # a branch, not bool(...): under torch.compile with symbolic sizes bool() would stay a SymBool
        is_causal = True if attn_mask is None and L > 1 and k.shape[2] == L else False
        if type(attn_mask) is torch.Tensor and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # an additive mask made in another dtype (autocast)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(Bsz, L, nq * hd)  # (B, L, nq*hd)
        if probe is not None:
            y = probe("attn_out", y)  # the input of o_proj: every head's output
        ow = _take(_take(self.o_proj.weight, 0, D), 1, qsel)
        return F.linear(y, ow, None if self.o_proj.bias is None else self.o_proj.bias[:D]), state


class MLP(nn.Module):
    """up -> squared ReLU -> down (Nemotron-H), or SwiGLU with a gate projection."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.act = cfg.mlp_act
        self.up_proj = nn.Linear(cfg.hidden_size, spec.ffn, bias=cfg.mlp_bias)
        if self.act == "swiglu":
            self.gate_proj = nn.Linear(cfg.hidden_size, spec.ffn, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(spec.ffn, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, u: torch.Tensor, active: LayerSpec | None = None, probe: Probe | None = None) -> torch.Tensor:
        D = u.shape[-1]
        f = self.up_proj.out_features if active is None else active.ffn

        def lin(m: nn.Linear) -> torch.Tensor:
            return F.linear(u, _take(_take(m.weight, 0, f), 1, D), None if m.bias is None else _take(m.bias, 0, f))

        h = lin(self.up_proj)
        h = F.silu(lin(self.gate_proj)) * h if self.act == "swiglu" else torch.relu(h).square()
        if probe is not None:
            h = probe("mlp_act", h)  # (B, L, ffn): neuron activations
        db = None if self.down_proj.bias is None else self.down_proj.bias[:D]
        return F.linear(h, _take(_take(self.down_proj.weight, 0, D), 1, f), db)


# --------------------------------------------------------------------------- mixture of experts
def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NemotronH's router: (expert index, routing weight), each (T, top_k), for tokens x (T, D).

    Logits and sigmoid scores in fp32. The selection bias only chooses; the weights are the
    unbiased scores of the chosen experts. Experts are grouped group-major (group g holds
    experts [g*E/G, (g+1)*E/G)); a group scores the sum of its top 2 and only the best
    ``topk_group`` groups may be chosen from.
    ``expert_mask`` (E,) (router training, soft mode): an expert masked to 0 is never chosen (as if
    sliced away), and the chosen experts' weights are scaled by their mask.
    """
    scores = F.linear(x.float(), weight.float()).sigmoid()  # (T, E)
    choice = scores + bias.float()
    if expert_mask is not None:
        choice = choice.masked_fill(expert_mask <= 0, float("-inf"))
    if topk_group < n_group:  # (all groups allowed: the mask would keep every expert)
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)  # (T, G, E/G)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # (T, G)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False)[1], True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    index = choice.topk(top_k, dim=-1, sorted=False)[1]  # (T, k)
    w = scores.gather(1, index)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    if expert_mask is not None:
        w = w * expert_mask.float()[index]
    return index, w * scaling


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these expert weights (E, out, in): whole, 16-byte rows.

    CPU kernels take any float dtype; CUDA ones bf16 on sm80+. Nested (sliced) weights are views
    with gaps and go through the per-expert loop instead.
    """
    if not hasattr(F, "grouped_mm") or not w.is_contiguous() or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":
        return w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (8, 0)
    b = w.element_size()
    return x.device.type == "cpu" and all(n * b % 16 == 0 for n in w.shape[1:]) and w.data_ptr() % 16 == 0


def _expert_linear(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of xs (S, in), sorted by expert with ``counts`` (E,) rows each, times their expert's w (E, out, in)."""
    if _grouped_mm_ok(xs, w):
        return F.grouped_mm(xs, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    ys, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync, then one GEMM per expert with tokens
        if n:
            ys.append(F.linear(xs[start : start + n], w[e]))
            start += n
    if not ys:
        return xs.new_zeros(0, w.shape[1])
    return torch.cat(ys) if len(ys) > 1 else ys[0]


def run_experts(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    probe: Probe | None = None,
) -> torch.Tensor:
    """sum_k w[t,k] * down_e(relu2(up_e(x_t))) with e = index[t,k]; x (T, D), up (E, F, D), down (E, D, F).

    Token-expert pairs are sorted by expert so that each expert's rows are contiguous, and both
    projections run as one grouped GEMM (torch.nn.functional.grouped_mm; a loop over experts
    where it cannot run); no loop over tokens. The weighted rows are summed back per token in
    fp32. Returns (T, D) in fp32.
    ``probe`` (importance) sees per-expert sums: "moe_expert_act" (E, F) of |activation| over the
    tokens routed to each expert, "moe_reap" (2, E) of routing weight * ||expert output|| and of
    token counts (the REAP score is their ratio).
    """
    T, k = index.shape
    flat = index.reshape(-1)  # (T*k,)
    order = flat.argsort()
    sorted_e = flat[order]
    token = order // k  # the token of each sorted pair
    counts = torch.bincount(flat, minlength=up.shape[0])  # (E,)
    xs = x.index_select(0, token)  # (T*k, D), grouped by expert
    h = torch.relu(_expert_linear(xs, up, counts)).square()  # (T*k, F)
    if probe is not None:
        h = probe("moe_act", h)  # (T*k, F): neuron activations of the routed experts (soft masks)
    y = _expert_linear(h, down, counts).float() * w.reshape(-1)[order, None]  # (T*k, D)
    if probe is not None:
        stats = torch.zeros(up.shape[0], up.shape[1] + 2, dtype=torch.float32, device=x.device)
        stats[:, :-2].index_add_(0, sorted_e, h.detach().float().abs())
        stats[:, -2].index_add_(0, sorted_e, y.detach().norm(dim=-1))  # |w| * ||out||: w >= 0
        stats[:, -1].index_add_(0, sorted_e, torch.ones_like(sorted_e, dtype=torch.float32))
        probe("moe_reap", stats[:, -2:].t().contiguous())
        probe("moe_expert_act", stats[:, :-2].contiguous())
    return torch.zeros(T, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, token, y)


class Router(nn.Module):
    """The router's weight (E, D) and selection bias (E,): fp32 whatever dtype the model is cast to."""

    def __init__(self, n_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def _apply(self, fn: Callable, recurse: bool = True) -> Router:
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)  # .to(bf16) moves devices too: keep the move, not the cast (as transformers does)
            return t.to(out.device) if t.dtype == torch.float32 and out.dtype != t.dtype else out

        return super()._apply(keep_fp32, recurse)


class MoE(nn.Module):
    """NemotronH mixture of experts: router -> top-k routed relu2 experts (3D weights) + one shared expert.

    Parameter names are transformers': ``gate.weight`` (E, D) and the selection bias
    ``gate.e_score_correction_bias`` (E,), both fp32 whatever the model's dtype; ``experts.up_proj``
    (E, F, D) and ``experts.down_proj`` (E, D, F); ``shared_experts.{up,down}_proj`` (an MLP).
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        E, Fe, D = spec.experts, spec.ffn, cfg.hidden_size
        self.top_k, self.n_group, self.topk_group = cfg.moe_top_k, cfg.moe_n_group, cfg.moe_topk_group
        self.norm_topk_prob, self.scaling = cfg.moe_norm_topk_prob, cfg.moe_routed_scaling_factor
        self.gate = Router(E, D)
        self.experts = nn.Module()
        self.experts.up_proj = nn.Parameter(torch.empty(E, Fe, D))
        self.experts.down_proj = nn.Parameter(torch.empty(E, D, Fe))
        shared = dataclasses.replace(cfg, mlp_act="relu2")
        self.shared_experts = MLP(shared, LayerSpec("mlp", ffn=spec.shared_ffn))

    def forward(self, u: torch.Tensor, active: LayerSpec | None = None, probe: Probe | None = None) -> torch.Tensor:
        Bsz, L, D = u.shape
        E = self.experts.up_proj.shape[0]
        esel = E if active is None else expert_index(E, self.n_group, active.experts)
        f = self.experts.up_proj.shape[1] if active is None else active.ffn
        x = u.reshape(-1, D)  # (T, D)
        gw = _take(_take(self.gate.weight, 0, esel), 1, D)
        bias = _take(self.gate.e_score_correction_bias, 0, esel)
        emask = None
        if probe is not None:  # router training may mask experts on selection (Tap "moe_experts")
            ones = torch.ones(E, device=u.device)
            emask = probe("moe_experts", ones) if active is None else None
            emask = None if emask is ones else emask
        index, w = route(
            x, gw, bias, self.top_k, self.n_group, self.topk_group, self.norm_topk_prob, self.scaling, emask
        )
        up = _take(_take(_take(self.experts.up_proj, 0, esel), 1, f), 2, D)  # (E', f, D)
        down = _take(_take(_take(self.experts.down_proj, 0, esel), 1, D), 2, f)  # (E', D, f)
        routed = run_experts(x, up, down, index, w, probe).to(u.dtype).view(Bsz, L, D)
        shared = None if active is None else LayerSpec("mlp", ffn=active.shared_ffn)
        return routed + self.shared_experts(u, shared, probe=probe)  # its "mlp_act": the shared neurons


# --------------------------------------------------------------------------- block + model
class Block(nn.Module):
    """Pre-norm residual block with one mixer: h + mixer(norm(h))."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.kind = spec.kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        mixer = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP, "moe": MoE}[spec.kind]
        self.mixer = mixer(cfg, spec)

    def forward(
        self,
        h: torch.Tensor,
        ctx: _StepContext,
        active: LayerSpec | None,
        state: AttentionState | MambaState | None,
        layer: int = 0,
        gate: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionState | MambaState | None]:
        # gate: the Tap's factor on this block's output, looked up by the caller so that the block's
        # code does not depend on ``layer`` unless the Tap reads activations (one compiled graph per kind)
        tap = ctx.tap
        reads = tap is not None and type(tap).activation is not Tap.activation  # gates only: the plain path
        probe = functools.partial(tap.activation, layer) if reads else None
        x = self.norm(h.to(self.norm.weight.dtype), ctx.hidden, ctx.hidden_mask)
        if probe is not None:
            x = probe("norm", x)
        if self.kind == "mamba":
            out, state = self.mixer(
                x,
                active,
                ctx.hidden,
                state,
                ctx.pad_mask,
                decode=ctx.use_cache,
                probe=probe,
                keep_steps=ctx.keep_steps,
                seq_idx=ctx.seq_idx,
                context=ctx.context,
            )
        elif self.kind == "attention":
            out, state = self.mixer(
                x,
                active,
                ctx.hidden,
                state,
                ctx.attn_mask,
                ctx.positions,
                make_state=ctx.use_cache,
                capacity=ctx.capacity,
                probe=probe,
                context=ctx.context,
            )
        else:
            out = self.mixer(x, active, probe=probe)
        if gate is not None:
            out = out * gate
        if ctx.hidden_mask is not None:  # soft hidden mask: the residual stream keeps only the kept channels
            out = out * ctx.hidden_mask.to(out.dtype)
        return h + out.to(h.dtype), state


@dataclass
class _StepContext:
    """What every block of one forward call shares: widths, masks, positions, cache use."""

    hidden: int
    pad_mask: torch.Tensor | None
    attn_mask: torch.Tensor | None
    positions: torch.Tensor | None
    use_cache: bool
    capacity: int
    tap: Tap | None = None
    hidden_mask: torch.Tensor | None = None  # (hidden,) soft router mask of the hidden channels
    keep_steps: bool = False  # Mamba layers keep their state after every token (speculative verify)
    seq_idx: torch.Tensor | None = None  # (B, L) packed documents: 0, 1, 2, ... one id per document
    context: SequencePart | None = None  # context parallelism: the earlier parts of every sequence


def _documents(
    input_ids: torch.Tensor, segment_ids: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Any
) -> torch.Tensor | None:
    """Packed documents as run ids (B, L): 0 for the first run of equal segment ids, 1 for the next...

    Without segment_ids, position ids that restart at 0 mark the starts (transformers' padding-free
    collator). None when neither is given."""
    if segment_ids is None and position_ids is None:
        return None
    if cache is not None:
        raise ValueError(
            "segment_ids / position_ids (packed documents) run without a cache: cached decoding continues one "
            "document per row; give each document its own row (left padding and attention_mask)"
        )
    given = segment_ids if segment_ids is not None else position_ids
    if given.shape != input_ids.shape:
        name = "segment_ids" if segment_ids is not None else "position_ids"
        raise ValueError(
            f"{name} has shape {tuple(given.shape)}, input_ids {tuple(input_ids.shape)}: give one per token"
        )
    starts = given[:, 1:] != given[:, :-1] if segment_ids is not None else position_ids[:, 1:] == 0  # (B, L-1)
    return F.pad(starts.long().cumsum(-1), (1, 0))  # (B, L)


class HybridLM(nn.Module):
    """A Nemotron-H style hybrid LM; ``forward(input_ids, arch=None, cache=None)``.

    ``arch`` (an ArchSpec) runs a nested sub-network through views of these weights;
    ``budget`` names one of the frozen budgets of an elastic checkpoint.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, spec) for spec in config.layers)
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.elastic: dict[str, Budget] = {}  # budget name -> its frozen Budget (elastic checkpoints)
        self.source_dir: str | None = None  # where it was loaded from (tokenizer files live there)
        self.importance: Importance | None = None  # set once ranked (nestlm.reorder, or loaded)
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random init in the Nemotron-H manner (normal linears, S4D-real A, log-uniform dt)."""
        if self.embeddings.weight.is_meta:  # built on the meta device to be loaded into
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std

        def normal_(t: torch.Tensor, s: float = std) -> None:
            t.copy_(torch.randn(t.shape, generator=gen) * s)

        normal_(self.embeddings.weight)
        if self.lm_head is not None:
            normal_(self.lm_head.weight)
        for block in self.layers:
            block.norm.weight.fill_(1.0)
            for m in block.mixer.modules():
                if isinstance(m, nn.Linear):
                    normal_(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, RMSNorm):  # q/k norms
                    m.weight.fill_(1.0)
            mx = block.mixer
            if isinstance(mx, Mamba2Mixer):
                bound = 1.0 / math.sqrt(mx.K)
                mx.conv1d.weight.copy_((torch.rand(mx.conv1d.weight.shape, generator=gen) * 2 - 1) * bound)
                if mx.conv1d.bias is not None:
                    mx.conv1d.bias.copy_((torch.rand(mx.conv1d.bias.shape, generator=gen) * 2 - 1) * bound)
                mx.A_log.copy_(torch.log(torch.arange(1, mx.H + 1, dtype=torch.float32)))
                mx.D.fill_(1.0)
                lo, hi = math.log(self.config.mamba_dt_min), math.log(self.config.mamba_dt_init_max)
                dt = torch.exp(torch.rand(mx.H, generator=gen) * (hi - lo) + lo).clamp(min=1e-4)
                mx.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                mx.norm.weight.fill_(1.0)
                normal_(mx.out_proj.weight, std / math.sqrt(self.config.n_layers))
            elif isinstance(mx, MoE):
                for t in (mx.gate.weight, mx.experts.up_proj, mx.experts.down_proj):
                    normal_(t)
                mx.gate.e_score_correction_bias.zero_()
        self.norm_f.weight.fill_(1.0)

    # ------------------------------------------------------------- properties
    @property
    def budgets(self) -> list[str]:
        """Names of the frozen budgets of an elastic checkpoint ([] for a plain model)."""
        return list(self.elastic)

    def budget(self, name: str) -> Budget:
        """The frozen Budget record (target, ArchSpec, exact parameter count) of budget ``name``."""
        if isinstance(name, int) and not isinstance(name, bool):  # budget=50 for the budget named "50"
            name = str(name)
        if name not in self.elastic:
            known = ", ".join(self.budgets) or "none: this is not an elastic checkpoint"
            raise UnknownBudgetError(f"unknown budget {name!r}; known budgets: {known}")
        return self.elastic[name]

    def output_weight(self) -> torch.Tensor:
        return self.embeddings.weight if self.lm_head is None else self.lm_head.weight

    def resolve_arch(self, arch: ArchSpec | None = None, budget: str | None = None) -> ArchSpec | None:
        """The ArchSpec to run: ``arch`` itself, or the frozen one of budget ``budget``."""
        if budget is not None:
            if arch is not None:
                raise ValueError("give either arch= or budget=, not both")
            return self.budget(budget).arch
        return None if arch is None else arch.validate(self.config)  # a bad spec must not run silently

    def num_parameters(self, budget: str | None = None, arch: ArchSpec | None = None) -> int:
        """Parameter count of the full model, or of a budget's / arch's sub-network (exact)."""
        spec = self.resolve_arch(arch, budget)
        if spec is None:
            return sum(p.numel() for p in self.parameters())
        return spec.num_parameters(self.config)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        arch: ArchSpec | None = None,
        cache: InferenceCache | None = None,
        attention_mask: torch.Tensor | None = None,
        budget: str | None = None,
        num_logits: int | None = None,
        return_hidden: bool = False,
        tap: Tap | None = None,
        head: bool = True,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        context: SequencePart | None = None,
    ) -> ModelOutput:
        """Logits for ``input_ids`` (B, L).

        cache: an InferenceCache to read and extend (prefill when empty, then decode).
        attention_mask: (B, L) or (B, cached + L), 1 for real tokens, 0 for left padding.
        segment_ids: (B, L) ints, equal within a document and increasing along a row (packed documents):
            attention stays within a document, the Mamba conv and state restart at each, RoPE positions
            too; each document's logits are those it has alone. Without a cache only.
        position_ids: (B, L) RoPE positions; alone, transformers' padding-free convention: a 0 starts a
            document (as segment_ids would).
        num_logits: compute logits only for the last ``num_logits`` positions.
        tap: training only (importance scores, router masks and gates); see ``Tap``.
        head: False skips the lm_head: logits is None and hidden_states holds the final normed hidden
            states (B, L, hidden) for losses that apply the head in chunks (train/losses.py).
        context: training only: ``input_ids`` are one contiguous part of every sequence, and the earlier
            parts come through this ``SequencePart`` (context parallelism, train/context_parallel.py).
        """
        if context is not None and (cache is not None or attention_mask is not None):
            raise ValueError("context= (a part of every sequence, in training) takes no cache and no attention_mask")
        spec = self.resolve_arch(arch, budget)
        cfg = self.config
        Bsz, L = input_ids.shape
        hidden = cfg.hidden_size if spec is None else spec.hidden
        actives = [None] * cfg.n_layers if spec is None else spec.layers
        offset = cache.offset if cache is not None else 0
        if context is not None:  # the part's place in its sequence: positions and the causal offset of attention
            offset = context.offset(L)
        seq = _documents(input_ids, segment_ids, position_ids, cache)  # (B, L) 0, 1, 2, ... or None
        seq_keys = seq  # the documents of the keys attention reads (B, T)
        if context is not None and seq is not None:  # a part: number the documents from the sequence's start
            given = context.prefix(segment_ids if segment_ids is not None else position_ids)  # (B, offset + L)
            seq_keys = _documents(given, *((given, None) if segment_ids is not None else (None, given)), None)
            seq = seq_keys[:, -L:]

        # Padding: a (B, L) bool of real tokens, and the key mask over everything seen.
        pad_mask = None
        key_mask = None
        if attention_mask is not None:
            am = attention_mask.bool()
            cur = am[:, -L:]
            prev = cache.key_mask if cache is not None and cache.key_mask is not None else None
            if prev is None and offset:
                prev = torch.ones(Bsz, offset, dtype=torch.bool, device=am.device)
            key_mask = cur if prev is None else torch.cat([prev, cur], dim=1)
            if not bool(cur.all()):
                pad_mask = cur.to(self.embeddings.weight.dtype)
        elif cache is not None and cache.key_mask is not None:
            key_mask = torch.cat([cache.key_mask, cache.key_mask.new_ones(Bsz, L)], dim=1)
        if cache is not None:
            cache.key_mask = key_mask

        attn_mask = None
        positions = None
        has_attn = any(b.kind == "attention" for b in self.layers)
        if has_attn:
            q_pos = offset + torch.arange(L, device=input_ids.device)
            if key_mask is not None and not bool(key_mask.all()):
                k_pos = torch.arange(offset + L, device=input_ids.device)
                allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :]  # (B, L, T)
                # a padded query sees only itself, so it stays finite (its output is never used)
                allowed |= (k_pos[None, :] == q_pos[:, None])[None]
                attn_mask = allowed[:, None]  # (B, 1, L, T)
            elif offset and context is not None:  # the earlier parts' keys come first: causal from the lower right
                k_pos = torch.arange(offset + L, device=input_ids.device)
                attn_mask = causal_lower_right(L, offset + L) if input_ids.is_cuda else (k_pos <= q_pos[:, None])
            elif offset and L > 1:
                k_pos = torch.arange(offset + L, device=input_ids.device)
                attn_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
            if seq is not None:  # packed documents (no cache): a query sees its own document's keys only
                same = (seq[:, :, None] == seq_keys[:, None, :])[:, None]  # (B, 1, L, T)
                causal = torch.arange(seq_keys.shape[1], device=seq.device)[None, :] <= q_pos[:, None]  # (L, T)
                attn_mask = same & (causal if attn_mask is None or context is not None else attn_mask)
            if context is not None and attn_mask is not None and not input_ids.is_cuda:
                # CPU kernels turn a bool mask into a float one per call and keep it for the backward: one
                # additive mask (L x offset + L) for every layer instead (CUDA's take the causal bias as it is)
                zero = torch.zeros((), dtype=self.embeddings.weight.dtype, device=input_ids.device)
                attn_mask = zero.masked_fill(~attn_mask, float("-inf"))
            if cfg.rope_theta is not None:
                if key_mask is not None:
                    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
                else:
                    positions = q_pos[None].expand(Bsz, L)
                if position_ids is not None:
                    positions = position_ids
                elif seq is not None:  # count from each document's first token: subtract the count at its start
                    pos = positions  # (B, T): a part counts from the sequence's start
                    if context is not None:
                        pos = torch.arange(seq_keys.shape[1], device=seq.device).expand_as(seq_keys)
                    starts = F.pad(seq_keys[:, 1:] != seq_keys[:, :-1], (1, 0), value=True)  # (B, T)
                    positions = (pos - torch.where(starts, pos, 0).cummax(-1).values)[:, -L:]

        h = F.embedding(input_ids, self.embeddings.weight[:, :hidden])  # (B, L, hidden)
        if cfg.residual_in_fp32:
            h = h.float()
        emb_gate = None if tap is None else tap.embedding_gate()
        if emb_gate is not None:
            h = h * emb_gate
        hid_mask = None if tap is None else tap.hidden_mask()
        if hid_mask is not None:
            h = h * hid_mask.to(h.dtype)
        ctx = _StepContext(
            hidden,
            pad_mask,
            attn_mask,
            positions,
            cache is not None,
            cache.capacity if cache is not None else 0,
            tap,
            hid_mask,
        )
        ctx.keep_steps = cache is not None and cache.keep_steps
        ctx.seq_idx = seq
        ctx.context = context
        for i, block in enumerate(self.layers):
            if spec is not None and actives[i] is None:
                continue  # a dropped layer is the identity
            st = cache.layers[i] if cache is not None else None
            gate = None if tap is None else tap.block_gate(i)
            if self.gradient_checkpointing and self.training and cache is None:
                h, st = torch.utils.checkpoint.checkpoint(block, h, ctx, actives[i], st, i, gate, use_reentrant=False)
            else:
                h, st = block(h, ctx, actives[i], st, i, gate)
            if cache is not None and block.kind in ("mamba", "attention"):
                cache.layers[i] = st
        if cache is not None:
            cache.offset = offset + L
        if num_logits is not None:
            h = h[:, -num_logits:]
        h = self.norm_f(h.to(self.norm_f.weight.dtype), hidden, hid_mask)
        if not head:
            return ModelOutput(logits=None, cache=cache, hidden_states=h)
        logits = F.linear(h, self.output_weight()[:, :hidden]).float()
        return ModelOutput(logits=logits, cache=cache, hidden_states=h if return_hidden else None)

    # ----------------------------------------------------------- conveniences
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prefill + decode; see :func:`nestlm.generate.generate` for the arguments, and
        :func:`nestlm.decoding.generate` for ``budget_schedule=`` and speculative decoding (``draft_budget=``)."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Write this model as a nestlm directory (safetensors + JSON, atomically)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path)

    def slice(self, spec: ArchSpec | str) -> HybridLM:
        """A standalone, physically smaller HybridLM for an ArchSpec or a budget name."""
        from .elastic.slicing import slice_model

        if isinstance(spec, (str, int)):  # a budget name (budget=50 for "50")
            spec = self.budget(spec).arch
        return slice_model(self, spec)
