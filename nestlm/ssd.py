"""Mamba2 state-space duality (SSD) scan and the depthwise causal convolution.

``ssd_scan_ref`` is the reference: the chunked SSD algorithm in four einsum steps
(as in mamba's ``ssd_minimal.py``), pure PyTorch, any device, any sequence length.
``ssd_step`` is the one-token recurrence used in decode. Every fast path (the
``mamba_ssm`` Triton kernels, ``causal_conv1d``) sits behind the same signatures and
is tested against these.

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


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (reference).

    x: (b, L, H, P); dt: (b, L, H), already softplus-ed and clamped; A: (H,) negative;
    B, C: (b, L, G, N); D: (H,); initial_state: (b, H, P, N).
    Returns y: (b, L, H, P) in x's dtype and the final state (b, H, P, N) in fp32.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    dtype = x.dtype
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    x_in = x
    pad = (-L) % chunk_size
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is untouched
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    T = L + pad
    c = T // chunk_size
    xdt = (x * dt[..., None]).view(b, c, chunk_size, R, G, P)  # (b, c, l, r, g, p)
    Adt = (dt * A.float()).view(b, c, chunk_size, R, G).permute(0, 3, 4, 1, 2)  # (b, r, g, c, l)
    B = B.view(b, c, chunk_size, G, N)  # (b, c, l, g, n)
    C = C.view(b, c, chunk_size, G, N)
    A_cs = torch.cumsum(Adt, dim=-1)  # (b, r, g, c, l)

    # 1. Within each chunk (diagonal blocks): a masked, decayed "attention" C_l . B_s.
    Lmat = torch.exp(segsum(Adt))  # (b, r, g, c, l, s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, l, s)
    y_diag = torch.einsum("bcgls,brgcls,bcsrgp->bclrgp", CB, Lmat, xdt)

    # 2. The state each chunk leaves behind, from its own inputs.
    decay_states = torch.exp(A_cs[..., -1:] - A_cs)  # (b, r, g, c, l)
    states = torch.einsum("bclgn,brgcl,bclrgp->bcrgpn", B, decay_states, xdt)

    # 3. Carry states across chunk boundaries (a short recurrence over chunks).
    if initial_state is None:
        init = torch.zeros_like(states[:, :1])
    else:
        init = initial_state.float().view(b, 1, R, G, P, N)
    states = torch.cat([init, states], dim=1)  # (b, c+1, r, g, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))  # (b, r, g, c+1, c+1)
    states = torch.einsum("brgzc,bcrgpn->bzrgpn", decay_chunk, states)
    states, final = states[:, :-1], states[:, -1]

    # 4. What the carried-in state contributes to each position's output.
    y_off = torch.einsum("bclgn,bcrgpn,brgcl->bclrgp", C, states, torch.exp(A_cs))

    y = (y_diag + y_off).reshape(b, T, H, P)[:, :L]  # (b, L, H, P)
    if D is not None:
        y = y + x_in * D.float()[:, None]
    return y.to(dtype), final.reshape(b, H, P, N)


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
    dBx = torch.einsum("brg,bgn,brgp->brgpn", dtf.view(b, R, G), B.float(), xf.view(b, R, G, P))
    state = state * dA[..., None, None] + dBx.reshape(b, H, P, N)
    y = torch.einsum("brgpn,bgn->brgp", state.view(b, R, G, P, N), C.float()).reshape(b, H, P)
    if D is not None:
        y = y + xf * D.float()[:, None]
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan used by the model: the mamba_ssm kernel on CUDA when installed, else the reference."""
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
            return_final_states=True,
        )
        return y[:, :, from_gm], final[:, from_gm].float()
    return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, initial_state)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv + SiLU. x: (b, C, L); weight: (C, K); history: (b, C, K-1) or None (zeros)."""
    K = weight.shape[-1]
    if history is None and _causal_conv1d_fn is not None and x.is_cuda:
        return _causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, activation="silu")
    if history is None:
        xp = F.pad(x, (K - 1, 0))
    else:
        xp = torch.cat([history.to(x.dtype), x], dim=-1)
    out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out)
