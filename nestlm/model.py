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
and keeps inference's forward signature free of training arguments.

Imports run one way: this file imports config, cache, ssd and the index helpers only; the
thin conveniences at the bottom (generate, save_pretrained, slice) call modules that never
import this one back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .cache import AttentionState, InferenceCache, MambaState
from .config import LayerSpec, ModelConfig
from .elastic.index import head_channels, query_channels
from .errors import UnknownBudgetError
from .ssd import causal_conv1d, ssd_scan, ssd_step
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

    logits: torch.Tensor  # (B, L, vocab), fp32
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
        self.dt_min = cfg.mamba_dt_min
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
    ) -> tuple[torch.Tensor, MambaState | None]:
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
        xbc = causal_conv1d(xbc_in, w_conv, b_conv, history)  # (B, HP + d_bc, L)
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
        dt = F.softplus(dt.float() + self.dt_bias[:H].float()).clamp(min=self.dt_min)  # (B, L, H)
        Dskip = self.D[:H]
        if state is not None and L == 1:  # recurrent step
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
            )
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
        new_state = MambaState(new_conv, ssm) if new_conv is not None else None
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
        if state is None and make_state:
            shape = (Bsz, nkv, max(capacity, L), hd)
            state = AttentionState(k.new_zeros(shape), v.new_zeros(shape))
        if state is not None:
            k, v = state.append(k, v)
        if nq != nkv:  # query head j reads KV head j % nkv
            k = k.repeat(1, nq // nkv, 1, 1)
            v = v.repeat(1, nq // nkv, 1, 1)
        is_causal = attn_mask is None and L > 1 and k.shape[2] == L
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


# --------------------------------------------------------------------------- block + model
class Block(nn.Module):
    """Pre-norm residual block with one mixer: h + mixer(norm(h))."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.kind = spec.kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        mixer = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP}[spec.kind]
        self.mixer = mixer(cfg, spec)

    def forward(
        self,
        h: torch.Tensor,
        ctx: _StepContext,
        active: LayerSpec | None,
        state: AttentionState | MambaState | None,
        layer: int = 0,
    ) -> tuple[torch.Tensor, AttentionState | MambaState | None]:
        tap = ctx.tap
        reads = tap is not None and type(tap).activation is not Tap.activation  # gates only: the plain path
        probe = functools.partial(tap.activation, layer) if reads else None
        x = self.norm(h.to(self.norm.weight.dtype), ctx.hidden, ctx.hidden_mask)
        if probe is not None:
            x = probe("norm", x)
        if self.kind == "mamba":
            out, state = self.mixer(x, active, ctx.hidden, state, ctx.pad_mask, decode=ctx.use_cache, probe=probe)
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
            )
        else:
            out = self.mixer(x, active, probe=probe)
        gate = None if tap is None else tap.block_gate(layer)
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
        self.norm_f.weight.fill_(1.0)

    # ------------------------------------------------------------- properties
    @property
    def budgets(self) -> list[str]:
        """Names of the frozen budgets of an elastic checkpoint ([] for a plain model)."""
        return list(self.elastic)

    def budget(self, name: str) -> Budget:
        """The frozen Budget record (target, ArchSpec, exact parameter count) of budget ``name``."""
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
    ) -> ModelOutput:
        """Logits for ``input_ids`` (B, L).

        cache: an InferenceCache to read and extend (prefill when empty, then decode).
        attention_mask: (B, L) or (B, cached + L), 1 for real tokens, 0 for left padding.
        num_logits: compute logits only for the last ``num_logits`` positions.
        tap: training only (importance scores, router masks and gates); see ``Tap``.
        """
        spec = self.resolve_arch(arch, budget)
        cfg = self.config
        Bsz, L = input_ids.shape
        hidden = cfg.hidden_size if spec is None else spec.hidden
        actives = [None] * cfg.n_layers if spec is None else spec.layers
        offset = cache.offset if cache is not None else 0

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
            elif offset and L > 1:
                k_pos = torch.arange(offset + L, device=input_ids.device)
                attn_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
            if cfg.rope_theta is not None:
                if key_mask is not None:
                    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
                else:
                    positions = q_pos[None].expand(Bsz, L)

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
        for i, block in enumerate(self.layers):
            if spec is not None and actives[i] is None:
                continue  # a dropped layer is the identity
            st = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                h, st = torch.utils.checkpoint.checkpoint(block, h, ctx, actives[i], st, i, use_reentrant=False)
            else:
                h, st = block(h, ctx, actives[i], st, i)
            if cache is not None and block.kind != "mlp":
                cache.layers[i] = st
        if cache is not None:
            cache.offset = offset + L
        if num_logits is not None:
            h = h[:, -num_logits:]
        h = self.norm_f(h.to(self.norm_f.weight.dtype), hidden, hid_mask)
        logits = F.linear(h, self.output_weight()[:, :hidden]).float()
        return ModelOutput(logits=logits, cache=cache, hidden_states=h if return_hidden else None)

    # ----------------------------------------------------------- conveniences
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prefill + decode; see :func:`nestlm.generate.generate` for the arguments."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Write this model as a nestlm directory (safetensors + JSON, atomically)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path)

    def slice(self, spec: ArchSpec | str) -> HybridLM:
        """A standalone, physically smaller HybridLM for an ArchSpec or a budget name."""
        from .elastic.slicing import slice_model

        if isinstance(spec, str):
            spec = self.budget(spec).arch
        return slice_model(self, spec)
