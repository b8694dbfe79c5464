"""Mamba2 state-space duality (SSD) scan and the depthwise causal convolution.

``ssd_scan_ref`` is the reference: the chunked SSD algorithm in four einsum steps
(as in mamba's ``ssd_minimal.py``), pure PyTorch, any device, any sequence length.
``ssd_step`` is the one-token recurrence used in decode. Every fast path (the
``mamba_ssm`` Triton kernels, ``causal_conv1d``; on CPU ``ssd_scan_chunked`` and a
shifted-tap conv) sits behind the same signatures and is tested against these.

Packed documents: ``seq_idx`` (b, L), as mamba's kernels take it, ids equal within a document and
nondecreasing along a row; no conv window or SSM state reaches across documents (each runs as alone).

Head layout. nestlm stores Mamba heads *rank-major within groups*: head ``j`` reads
the B/C of group ``j % G`` (a Hugging Face checkpoint, which is group-major, is
permuted on load). Keeping the first ``k * G`` heads therefore keeps ``k`` heads in
every group, and an elastic sub-network is a contiguous prefix of the weights.
Shapes below: b batch, l/s positions, c chunk, r rank in group, g group, h = r*G + g
head, p head dim, n state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional CUDA kernels, used behind the same signatures
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_chunk_scan
except Exception:  # pragma: no cover - absent on CPU machines
    _mamba_chunk_scan = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except Exception:  # pragma: no cover
    _causal_conv1d_fn = None


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum(x[..., j+1 : i+1]) for i >= j, else -inf."""
    s = x.size(-1)
    x = x[..., None].expand(*x.shape, s)  # (..., s, s): x[..., k, j] = x_k
    strict = torch.ones(s, s, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~strict.logical_or(torch.eye(s, dtype=torch.bool, device=x.device)), -torch.inf)


def _fp32_padded(
    x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """fp32 copies padded on the sequence to a multiple of chunk_size; also the unpadded fp32 x and T.

    dt = 0 on padding: no decay and no input, so the final state is untouched.
    """
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    x_in = x
    pad = (-x.shape[1]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    return x_in, (x, dt, B, C), x.shape[1]


class _Segments:
    """Which pairs of positions and chunk states of a chunked scan share a document. Padding continues the
    last document (dt = 0 there); ``ends`` (b, c+1): the document of each carried state, the initial one first."""

    def __init__(self, seq_idx: torch.Tensor, T: int, chunk_size: int) -> None:
        b, L = seq_idx.shape
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, T - L)], 1).view(b, T // chunk_size, chunk_size)
        self.within = seq[..., :, None] == seq[..., None, :]  # (b, c, l, s): position s may reach position l
        self.to_end = seq == seq[..., -1:]  # (b, c, l): position l reaches the state its chunk leaves
        self.ends = torch.cat([seq[:, :1, 0], seq[:, :, -1]], 1)  # (b, c+1)
        self.carried = self.ends[:, :, None] == self.ends[:, None, :]  # (b, c+1, c+1): state c reaches state z
        self.from_start = seq == self.ends[:, :-1, None]  # (b, c, l): the state entering chunk c reaches l


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (reference).

    x: (b, L, H, P); dt: (b, L, H), already softplus-ed and clamped; A: (H,) negative;
    B, C: (b, L, G, N); D: (H,); initial_state: (b, H, P, N); seq_idx: (b, L) document ids.
    Returns y: (b, L, H, P) in x's dtype and the final state (b, H, P, N) in fp32 (the last document's).
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    dtype = x.dtype
    x_in, (x, dt, B, C), T = _fp32_padded(x, dt, B, C, chunk_size)
    c = T // chunk_size
    xdt = (x * dt[..., None]).view(b, c, chunk_size, R, G, P)  # (b, c, l, r, g, p)
    Adt = (dt * A.float()).view(b, c, chunk_size, R, G).permute(0, 3, 4, 1, 2)  # (b, r, g, c, l)
    B = B.view(b, c, chunk_size, G, N)  # (b, c, l, g, n)
    C = C.view(b, c, chunk_size, G, N)
    A_cs = torch.cumsum(Adt, dim=-1)  # (b, r, g, c, l)
    seg = None if seq_idx is None else _Segments(seq_idx, T, chunk_size)

    # 1. Within each chunk (diagonal blocks): a masked, decayed "attention" C_l . B_s.
    Lmat = torch.exp(segsum(Adt))  # (b, r, g, c, l, s)
    if seg is not None:  # no position reaches one of another document
        Lmat = Lmat * seg.within[:, None, None]
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, l, s)
    y_diag = torch.einsum("bcgls,brgcls,bcsrgp->bclrgp", CB, Lmat, xdt)

    # 2. The state each chunk leaves behind, from its own inputs.
    decay_states = torch.exp(A_cs[..., -1:] - A_cs)  # (b, r, g, c, l)
    if seg is not None:  # only the chunk's last document is in the state it leaves
        decay_states = decay_states * seg.to_end[:, None, None]
    states = torch.einsum("bclgn,brgcl,bclrgp->bcrgpn", B, decay_states, xdt)

    # 3. Carry states across chunk boundaries (a short recurrence over chunks).
    if initial_state is None:
        init = torch.zeros_like(states[:, :1])
    else:
        init = initial_state.float().view(b, 1, R, G, P, N)
    states = torch.cat([init, states], dim=1)  # (b, c+1, r, g, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))  # (b, r, g, c+1, c+1)
    if seg is not None:  # a state is carried only as far as its document runs
        decay_chunk = decay_chunk * seg.carried[:, None, None]
    states = torch.einsum("brgzc,bcrgpn->bzrgpn", decay_chunk, states)
    states, final = states[:, :-1], states[:, -1]

    # 4. What the carried-in state contributes to each position's output.
    decay_in = torch.exp(A_cs)  # (b, r, g, c, l)
    if seg is not None:
        decay_in = decay_in * seg.from_start[:, None, None]
    y_off = torch.einsum("bclgn,bcrgpn,brgcl->bclrgp", C, states, decay_in)

    y = (y_diag + y_off).reshape(b, T, H, P)[:, :L]  # (b, L, H, P)
    if D is not None:
        y = y + x_in * D.float()[:, None]
    return y.to(dtype), final.reshape(b, H, P, N)


def _tril_mask(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True on and below the diagonal; cached per (n, device)."""
    if torch.compiler.is_compiling():  # a constant of the graph; a dict lookup would be a guard per size
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()
    key = (n, str(device))
    m = _TRIL_CACHE.get(key)
    if m is None:
        m = _TRIL_CACHE[key] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return m


_TRIL_CACHE: dict[tuple[int, str], torch.Tensor] = {}


class _DecayedScores(torch.autograd.Function):
    """M[b, c, r, g, l, s] = exp(cs_l - cs_s) * CB[b, c, g, l, s] for s <= l, else 0 (head h = r*G + g).

    Autograd through sub -> masked_fill -> exp -> mul would make about twice as many passes
    over these (l, s) tensors, the largest in the scan; the backward here is
    dM/dcs_l = M, dM/dcs_s = -M and dM/dCB = exp(cs_l - cs_s).
    """

    @staticmethod
    def forward(ctx, A_cs: torch.Tensor, CB: torch.Tensor, within: torch.Tensor | None) -> torch.Tensor:
        # A_cs: (b, c, h, l) within-chunk cumsums of dt*A; CB: (b, c, g, l, s); within: None or (b, c, l, s)
        b, c, H, Q = A_cs.shape
        G = CB.shape[2]
        E = A_cs[..., :, None] - A_cs[..., None, :]  # (b, c, h, l, s)
        allowed = _tril_mask(Q, A_cs.device) if within is None else _tril_mask(Q, A_cs.device) & within[:, :, None]
        E.masked_fill_(~allowed, -torch.inf).exp_()
        M = E.view(b, c, H // G, G, Q, Q) * CB[:, :, None]
        ctx.save_for_backward(E, M)
        return M

    @staticmethod
    def backward(ctx, gM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        E, M = ctx.saved_tensors
        b, c, R, G, Q, _ = M.shape
        gS = (gM * M).view(b, c, R * G, Q, Q)
        g_cs = gS.sum(-1) - gS.sum(-2)
        g_CB = (gM * E.view(b, c, R, G, Q, Q)).sum(2)
        return g_cs, g_CB, None  # E and M are 0 where masked: no gradient reaches there


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan of ``ssd_scan_ref``, arranged for speed in plain PyTorch (CPU).

    Same arguments, results and head layout. Differences from the reference, none semantic:
      * per-head tensors live as (b, c, h, l, .), so every contraction is one batched matmul;
      * within-chunk decays are exp(cs_l - cs_s) from one cumulative sum (as mamba's kernels
        compute them) instead of the masked cumsum of an (l, s) expansion;
      * the decays are folded into B (states) and C (carried-in output) per head, and the
        diagonal blocks are accumulated onto the carried-in output with one baddbmm.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q = chunk_size
    dtype = x.dtype
    x_in, (x, dt, B, C), T = _fp32_padded(x, dt, B, C, Q)
    c = T // Q
    dtc = dt.view(b, c, Q, H).transpose(2, 3)  # (b, c, h, l)
    A_cs = torch.cumsum(dtc * A.float()[:, None], dim=-1)  # (b, c, h, l)
    # xdt in (b, c, h, l, p): the layout of the batched matmuls below
    xdt = (x.view(b, c, Q, H, P).transpose(2, 3) * dtc[..., None]).contiguous()
    Bc = B.view(b, c, Q, G, N).transpose(2, 3)  # (b, c, g, l, n)
    Cc = C.view(b, c, Q, G, N).transpose(2, 3)
    seg = None if seq_idx is None else _Segments(seq_idx, T, Q)

    # 1. diagonal blocks: M[l, s] = C_l . B_s * exp(cs_l - cs_s) for s <= l, per head
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, g, l, s)
    M = _DecayedScores.apply(A_cs, CB, None if seg is None else seg.within)  # (b, c, r, g, l, s)

    # 2. the state each chunk leaves behind: sum_l xdt_l (x) B_l exp(cs_last - cs_l)
    decay_states = torch.exp(A_cs[..., -1:] - A_cs)  # (b, c, h, l)
    if seg is not None:
        decay_states = decay_states * seg.to_end[:, :, None]
    decay_states = decay_states.view(b, c, R, G, Q, 1)
    B_dec = Bc[:, :, None] * decay_states  # (b, c, r, g, l, n)
    xdt6 = xdt.view(b, c, R, G, Q, P)
    states = torch.matmul(xdt6.transpose(-1, -2), B_dec)  # (b, c, r, g, p, n)

    # 3. carry states across chunk boundaries
    if initial_state is None:
        init = states.new_zeros(b, 1, H * P * N)
    else:
        init = initial_state.float().reshape(b, 1, H * P * N)
    states = torch.cat([init, states.view(b, c, H * P * N)], dim=1).view(b, c + 1, H, P * N)
    decay_chunk = torch.exp(segsum(F.pad(A_cs[..., -1].transpose(1, 2), (1, 0))))  # (b, h, c+1, c+1)
    if seg is not None:
        decay_chunk = decay_chunk * seg.carried[:, None]
    states = torch.einsum("bhzc,bchm->bzhm", decay_chunk, states)  # (b, c+1, h, p*n)
    final = states[:, -1].reshape(b, H, P, N)
    states = states[:, :-1].reshape(b, c, R, G, P, N)

    # 4. carried-in state -> output (C decayed by exp(cs_l)), plus the diagonal blocks
    decay_in = torch.exp(A_cs)  # (b, c, h, l)
    if seg is not None:
        decay_in = decay_in * seg.from_start[:, :, None]
    C_dec = Cc[:, :, None] * decay_in.view(b, c, R, G, Q, 1)  # (b, c, r, g, l, n)
    y = torch.matmul(C_dec, states.transpose(-1, -2))  # (b, c, r, g, l, p)
    y = torch.baddbmm(y.view(-1, Q, P), M.view(-1, Q, Q), xdt.view(-1, Q, P))
    y = y.view(b, c, H, Q, P).transpose(2, 3).reshape(b, T, H, P)[:, :L]  # (b, L, H, P)
    if D is not None:
        y = torch.addcmul(y, x_in, D.float()[:, None])
    return y.to(dtype), final


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence h <- exp(dt A) h + dt B x;  y = C h + D x.

    state: (b, H, P, N) fp32; x: (b, H, P); dt: (b, H); B, C: (b, G, N).
    Returns y (b, H, P) in x's dtype and the new state.
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    xf, dtf = x.float(), dt.float()
    dA = torch.exp(dtf * A.float())  # (b, H)
    xdt = (xf * dtf[..., None]).view(b, R, G, P, 1)
    # h = exp(dt A) h + (dt x) (x) B, with head r*G + g reading group g's B
    state = torch.addcmul((state * dA.view(b, H, 1, 1)).view(b, R, G, P, N), xdt, B.float().view(b, 1, G, 1, N))
    state = state.view(b, H, P, N)
    y = torch.matmul(state.view(b, R, G, P, N), C.float().view(b, 1, G, N, 1)).view(b, H, P)
    if D is not None:
        y = torch.addcmul(y, xf, D.float()[:, None])
    return y.to(x.dtype), state


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan used by the model: the mamba_ssm kernel on CUDA when installed, ``ssd_scan_chunked``
    on CPU, else the reference."""
    if _mamba_chunk_scan is not None and x.is_cuda:
        b, L, H, P = x.shape
        G = B.shape[2]
        R = H // G
        # The kernel maps head h to group h // R (group-major); ours is rank-major (h % G).
        to_gm = torch.arange(H, device=x.device).view(R, G).t().reshape(-1)  # group-major -> ours
        from_gm = torch.argsort(to_gm)
        y, final = _mamba_chunk_scan(
            x[:, :, to_gm].contiguous(),
            dt[:, :, to_gm].contiguous(),
            A[to_gm].float(),
            B.contiguous(),
            C.contiguous(),
            chunk_size,
            D=None if D is None else D[to_gm].float(),
            initial_states=None if initial_state is None else initial_state[:, to_gm].contiguous(),
            seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
            return_final_states=True,
        )
        return y[:, :, from_gm], final[:, from_gm].float()
    if x.device.type == "cpu":
        # The chunk length is a blocking choice, exact up to rounding: on CPU the (l, s) work
        # per token grows with it, and 64 is faster than 128 at the usual head_dim/d_state of 64.
        return ssd_scan_chunked(x, dt, A, B, C, min(chunk_size, 64), D, initial_state, seq_idx)
    return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    history: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU. x: (b, C, L); weight: (C, K); history: (b, C, K-1) or None (zeros);
    seq_idx (b, L): document ids, a window reads only its own document (the history is the first one's)."""
    K = weight.shape[-1]
    if history is None and _causal_conv1d_fn is not None and x.is_cuda:
        if seq_idx is None:
            return _causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, activation="silu")
        xc = x if x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)  # seq_idx: channel-last
        return _causal_conv1d_fn(xc, weight.contiguous(), bias, seq_idx.to(torch.int32).contiguous(), activation="silu")
    if x.device.type == "cpu":
        keep = None if seq_idx is None else _window_keep(seq_idx, K, history is not None)  # (b, L, K)
        return _causal_conv1d_taps(x, weight, bias, history, keep)
    return causal_conv1d_ref(x, weight, bias, history, seq_idx)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    history: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``causal_conv1d`` through F.conv1d, or with seq_idx as masked windows (the reference, any device)."""
    K = weight.shape[-1]
    if history is None:
        xp = F.pad(x, (K - 1, 0))
    else:
        xp = torch.cat([history.to(x.dtype), x], dim=-1)
    if seq_idx is not None:  # the windows themselves (b, C, L, K), each masked to its own document
        keep = _window_keep(seq_idx, K, history is not None).to(x.dtype)  # (b, L, K)
        out = torch.einsum("bclk,blk,ck->bcl", xp.unfold(-1, K, 1), keep, weight.to(x.dtype))
        return F.silu(out if bias is None else out + bias[:, None])
    out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out)


def _window_keep(seq_idx: torch.Tensor, K: int, history: bool) -> torch.Tensor:
    """(b, L, K) bool: whether tap k of the window ending at t (it reads t - (K-1) + k) reads t's document;
    positions before 0 are the history (the first document's) or zeros."""
    before = seq_idx[:, :1] if history else torch.full_like(seq_idx[:, :1], -1)
    padded = torch.cat([before.expand(-1, K - 1), seq_idx], 1)  # (b, K-1+L)
    return padded.unfold(1, K, 1) == seq_idx[..., None]


class _ConvTaps(torch.autograd.Function):
    """Depthwise causal conv (no activation) as K shifted multiply-adds over (b, L, C), with a
    hand-written backward: autograd through the K slices of the padded input would allocate
    and zero-fill a full-size gradient per tap."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None):
        # xp: (b, K-1+L, C) padded input; wt: (K, C) taps; bias: (C,) or None;
        # keep: None, or (K, b, L, 1) 1 where tap k reads the output position's own document
        K = wt.shape[0]
        L = xp.shape[1] - K + 1
        xp_k = [xp[:, k : k + L] if keep is None else xp[:, k : k + L] * keep[k] for k in range(K)]  # (b, L, C)
        out = xp_k[0] * wt[0] if bias is None else torch.addcmul(bias, xp_k[0], wt[0])
        for k in range(1, K):
            out.addcmul_(xp_k[k], wt[k])
        ctx.save_for_backward(xp, wt, keep)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, wt, keep = ctx.saved_tensors
        K = wt.shape[0]
        L = g.shape[1]
        g_xp = g_wt = g_b = None
        gk = [g if keep is None else g * keep[k] for k in range(K)]
        if ctx.needs_input_grad[0]:
            g_xp = xp.new_zeros(xp.shape)
            for k in range(K):
                g_xp[:, k : k + L].addcmul_(gk[k], wt[k])
        if ctx.needs_input_grad[1]:
            g_wt = torch.stack([(gk[k] * xp[:, k : k + L]).sum((0, 1)) for k in range(K)])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = g.sum((0, 1))
        return g_xp, g_wt, g_b, None


def _causal_conv1d_taps(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    history: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``causal_conv1d`` on CPU as K shifted multiply-adds, computed channel-last.

    The model hands in x as a transposed view of a (b, L, C) tensor; working in that layout
    avoids two transposing copies, and the backward is a few elementwise ops and reductions
    instead of the depthwise ``convolution_backward`` (oneDNN), which is slow on CPU and, when
    the cores are shared with another process, can take seconds per call.
    Returns a (b, C, L) view of a (b, L, C) tensor.
    """
    b, C, L = x.shape
    K = weight.shape[-1]
    if L == 1 and history is not None and keep is None:  # decode: one output from the window [history, x]
        win = torch.cat([history.to(x.dtype), x], dim=-1)  # (b, C, K)
        out = (win * weight).sum(-1, keepdim=True)
        return F.silu(out if bias is None else out + bias[:, None])
    xt = x.transpose(1, 2)  # (b, L, C)
    if history is None:
        xp = F.pad(xt, (0, 0, K - 1, 0))
    else:
        xp = torch.cat([history.to(x.dtype).transpose(1, 2), xt], dim=1)  # (b, K-1+L, C)
    if keep is not None:
        keep = keep.permute(2, 0, 1)[..., None].to(x.dtype)  # (K, b, L, 1)
    out = _ConvTaps.apply(
        xp.contiguous(), weight.t().contiguous().to(x.dtype), None if bias is None else bias.to(x.dtype), keep
    )
    return F.silu(out).transpose(1, 2)
