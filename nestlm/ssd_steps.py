"""The verify forward's scan: the SSM state after every token of a short forward (speculative
decoding rolls each row back to one of them), and its output, equal to ``ssd.ssd_step`` token by
token (``ssd_steps_loop`` is that decode, the oracle of tests/unit/test_ssd.py).
"""

from __future__ import annotations

import torch

from .ssd import ssd_step

# L * H * P * N from which a verify forward of L >= 3 tokens takes the quadratic form; below, and
# at L <= 2, the L-step loop's few small ops are cheaper on CPU (bench_generate.py --sections s)
QUADRATIC_MIN = 2**17


def uses_quadratic(L: int, H: int, P: int, N: int) -> bool:
    """Whether ``ssd_steps`` of L tokens and an (H, P, N) state takes the quadratic form."""
    return L >= 3 and L * H * P * N >= QUADRATIC_MIN


class SSMSteps:
    """The SSM state after each of the L tokens of a verify forward, computed when asked for.

    Speculative decoding rolls each row back to ONE of those states (the last accepted token), so
    they are not all materialised: the state after token t is exp(S_t) h0 + sum_{s<=t} exp(S_t - S_s)
    dt_s x_s (x) B_s, one contraction over s (S: the cumulative log decay). ``states`` holds them
    all instead where the sequential loop made them (short forwards of small models, see ssd_steps).
    """

    def __init__(
        self,
        h0: torch.Tensor | None = None,
        S: torch.Tensor | None = None,
        xdt: torch.Tensor | None = None,
        Bh: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> None:
        self.h0, self.S, self.xdt, self.Bh, self.states = h0, S, xdt, Bh, states

    def __len__(self) -> int:
        return (self.states if self.states is not None else self.S).shape[1]

    def at(self, idx: torch.Tensor | int) -> torch.Tensor:
        """Row b's state after its token idx[b] (an int: the same token for every row), (b, H, P, N) fp32."""
        if self.states is not None and isinstance(idx, int):
            return self.states[:, idx]
        if self.states is not None:
            return self.states[torch.arange(len(idx), device=idx.device), idx]
        b, L, _ = self.S.shape
        if isinstance(idx, int):
            idx = torch.full((b,), idx, dtype=torch.long, device=self.S.device)
        rows = torch.arange(b, device=idx.device)
        St = self.S[rows, idx]  # (b, H)
        w = torch.exp(St[:, None] - self.S)  # (b, s, H): decay from after token s to after token idx
        w = w * (torch.arange(L, device=idx.device)[None] <= idx[:, None])[..., None]  # only s <= idx
        h = torch.einsum("bsh,bshp,bshn->bhpn", w, self.xdt, self.Bh)
        return h + torch.exp(St)[..., None, None] * self.h0


def ssd_steps(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SSMSteps]:
    """``ssd_step`` over L tokens, keeping the state after every one (speculative verify: exact rollback).

    x: (b, L, H, P); dt: (b, L, H); B, C: (b, L, G, N). Returns y (b, L, H, P) and the states after
    each token (:class:`SSMSteps`), each the one a token-by-token decode reaches (up to float
    rounding). Short forwards of small models run the L steps (``ssd_steps_loop``); otherwise y
    comes from the quadratic (attention-like) form of the recurrence over the L tokens and the
    states are left to :meth:`SSMSteps.at`: L sequential steps of a large state cost L state-sized
    passes, the quadratic form about two.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if not uses_quadratic(L, H, P, N):
        y, states = ssd_steps_loop(state, x, dt, A, B, C, D)
        return y, SSMSteps(states=states)
    R = H // G
    xf, dtf = x.float(), dt.float()
    S = torch.cumsum(dtf * A.float(), 1)  # (b, L, H) log decay from the start to after token t
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (S[:, :, None] - S[:, None]).masked_fill(~causal[None, :, :, None], float("-inf"))  # (b, t, s, H)
    # head r*G + g reads group g: repeating the groups R times gives each head its group's B and C
    Bh, Ch = B.float().repeat(1, 1, R, 1), C.float().repeat(1, 1, R, 1)  # (b, L, H, N)
    xdt = xf * dtf[..., None]  # (b, L, H, P)
    W = torch.einsum("bthn,bshn->btsh", Ch, Bh) * torch.exp(seg)  # (b, t, s, H): C_t . B_s, decayed
    h0 = state.float()
    y = torch.einsum("btsh,bshp->bthp", W, xdt)  # the L tokens' own inputs
    y = y + torch.einsum("bthn,bhpn->bthp", Ch, h0) * torch.exp(S)[..., None]  # the carried-in state, decayed
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), SSMSteps(h0, S, xdt, Bh)


def ssd_steps_loop(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L sequential ``ssd_step`` calls: y (b, L, H, P) and the states (b, L, H, P, N) after each token."""
    ys, states = [], []
    for t in range(x.shape[1]):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
        states.append(state)
    return torch.stack(ys, 1), torch.stack(states, 1)
