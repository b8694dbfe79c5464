"""The SSD scan against a naive per-timestep recurrence; the decode step, segsum, the fast paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlm import ssd, ssd_steps


def naive(x, dt, A, B, C, D=None, h0=None):
    """In float64, one position at a time: h <- exp(dt A) h + dt B x;  y = C h + D x.

    Head j reads the B and C of group j % G (nestlm's rank-major head order).
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    g = torch.arange(H) % G
    h = torch.zeros(b, H, P, N, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(L):
        xt, dtt = x[:, t].double(), dt[:, t].double()  # (b, H, P), (b, H)
        Bt, Ct = B[:, t][:, g].double(), C[:, t][:, g].double()  # (b, H, N)
        for j in range(H):
            decay = torch.exp(dtt[:, j] * A[j].double())  # (b,)
            h[:, j] = decay[:, None, None] * h[:, j] + dtt[:, j, None, None] * xt[:, j, :, None] * Bt[:, j, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, Ct)
        if D is not None:
            y = y + D.double()[:, None] * xt
        ys.append(y)
    return torch.stack(ys, 1), h


def inputs(L, H=6, G=2, P=5, N=4, b=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g)
    dt = F.softplus(torch.randn(b, L, H, generator=g) - 1)
    A = -torch.rand(H, generator=g) - 0.2
    B = torch.randn(b, L, G, N, generator=g)
    C = torch.randn(b, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# lengths below, at and across chunk boundaries, none of them (except 16) a multiple of 8
@pytest.mark.parametrize("L", [1, 7, 16, 37])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(("H", "G"), [(6, 2), (4, 1), (6, 6)])
def test_reference_scan_equals_recurrence(L: int, with_state: bool, H: int, G: int) -> None:
    x, dt, A, B, C, D = inputs(L, H=H, G=G, seed=L)
    h0 = torch.randn(2, H, 5, 4, generator=torch.Generator().manual_seed(9)) if with_state else None
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=8, D=D, initial_state=h0)
    yn, hn = naive(x, dt, A, B, C, D, h0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert hT.shape == (2, H, 5, 4) and hT.dtype == torch.float32
    assert maxdiff(y, yn) < 1e-4
    assert maxdiff(hT, hn) < 1e-4


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_reference_scan_any_chunk_size(chunk_size: int) -> None:
    """The chunk length is a blocking choice only: 1, odd, and longer than the sequence."""
    x, dt, A, B, C, D = inputs(23, seed=4)
    h0 = torch.randn(2, 6, 5, 4)
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=h0)
    yn, hn = naive(x, dt, A, B, C, D, h0)
    assert maxdiff(y, yn) < 1e-4 and maxdiff(hT, hn) < 1e-4


def test_reference_scan_without_D() -> None:
    x, dt, A, B, C, _ = inputs(11, seed=5)
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=4)
    yn, hn = naive(x, dt, A, B, C)
    assert maxdiff(y, yn) < 1e-4 and maxdiff(hT, hn) < 1e-4


def test_scan_in_two_pieces_equals_one_scan() -> None:
    """What a chunked prefill relies on: the final state of a prefix is the initial state of the rest."""
    x, dt, A, B, C, D = inputs(41, seed=6)
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=8, D=D)
    y1, h1 = ssd.ssd_scan_ref(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], chunk_size=8, D=D)
    y2, h2 = ssd.ssd_scan_ref(x[:, 19:], dt[:, 19:], A, B[:, 19:], C[:, 19:], chunk_size=8, D=D, initial_state=h1)
    assert maxdiff(torch.cat([y1, y2], 1), y) < 1e-5 and maxdiff(h2, hT) < 1e-5


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(("H", "G"), [(6, 2), (6, 3), (4, 1)])
def test_step_repeated_equals_scan(with_state: bool, H: int, G: int) -> None:
    L = 13
    x, dt, A, B, C, D = inputs(L, H=H, G=G, seed=2)
    h0 = torch.randn(2, H, 5, 4, generator=torch.Generator().manual_seed(3)) if with_state else None
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=4, D=D, initial_state=h0)
    h = torch.zeros(2, H, 5, 4) if h0 is None else h0.clone()
    for t in range(L):
        yt, h = ssd.ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert yt.shape == (2, H, 5) and h.dtype == torch.float32
        assert maxdiff(yt, y[:, t]) < 1e-4, t
    assert maxdiff(h, hT) < 1e-4


@pytest.mark.parametrize("L", [1, 2, 5, 9])
@pytest.mark.parametrize(("H", "G", "P", "N"), [(6, 2, 5, 4), (4, 1, 5, 4), (16, 4, 32, 64)])
@pytest.mark.parametrize("with_D", [True, False])
def test_steps_keep_every_state_of_the_token_by_token_decode(
    L: int, H: int, G: int, P: int, N: int, with_D: bool
) -> None:
    """ssd_steps (the verify forward; the last shape takes its quadratic form) equals L sequential
    ssd_step calls and the float64 recurrence, at every token and for per-row token indices."""
    x, dt, A, B, C, D = inputs(L, H=H, G=G, P=P, N=N, seed=4)
    D = D if with_D else None
    dt = dt * 3  # strong decays too
    h0 = torch.randn(2, H, P, N, generator=torch.Generator().manual_seed(5)) * 0.3
    y, steps = ssd_steps.ssd_steps(h0, x, dt, A, B, C, D)
    assert (steps.states is None) == (L >= 3 and L * H * P * N >= ssd_steps.QUADRATIC_MIN)  # both paths are covered
    y_loop, states_loop = ssd_steps.ssd_steps_loop(h0, x, dt, A, B, C, D)

    def close(a: torch.Tensor, ref: torch.Tensor) -> bool:  # fp32 rounding of sums of N terms: relative
        return maxdiff(a, ref) < 1e-5 * max(1.0, ref.abs().max().item())

    assert y.shape == (2, L, H, P) and len(steps) == L and close(y, y_loop)
    for t in range(L):  # every kept state is the recurrence's after token t
        yt, ht = naive(x[:, : t + 1], dt[:, : t + 1], A, B[:, : t + 1], C[:, : t + 1], D, h0)
        h = steps.at(t)
        assert h.shape == (2, H, P, N) and h.dtype == torch.float32
        assert close(h, ht) and close(h, states_loop[:, t]) and close(y[:, t], yt[:, t]), t
    idx = torch.tensor([L - 1, 0])  # rows rolled back to different tokens
    assert close(steps.at(idx), torch.stack([states_loop[0, L - 1], states_loop[1, 0]]))


def test_step_equals_recurrence_without_D() -> None:
    x, dt, A, B, C, _ = inputs(3, seed=8)
    yn, hn = naive(x, dt, A, B, C)
    h = torch.zeros(2, 6, 5, 4)
    for t in range(3):
        yt, h = ssd.ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        assert maxdiff(yt, yn[:, t]) < 1e-5
    assert maxdiff(h, hn) < 1e-5


def test_segsum_matches_its_definition() -> None:
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = ssd.segsum(x)
    assert s.shape == (2, 3, 9, 9)
    for i in range(9):
        for j in range(9):
            if i >= j:  # sum of x[j+1 .. i]; 0 on the diagonal
                assert torch.allclose(s[..., i, j], x[..., j + 1 : i + 1].sum(-1), atol=1e-12), (i, j)
            else:
                assert torch.isneginf(s[..., i, j]).all(), (i, j)
    e = torch.exp(ssd.segsum(torch.tensor([1.0, 2.0, 3.0])))
    assert torch.equal(e.triu(1), torch.zeros(3, 3))  # exp(-inf) = 0 above the diagonal
    assert ssd.segsum(torch.tensor([1.0, 2.0, 3.0]))[2, 0] == 5.0


@pytest.mark.parametrize("L", [5, 64, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_cpu_scan_equals_reference_with_grads(L: int, with_state: bool) -> None:
    """ssd_scan on CPU (the chunked batched-matmul path, custom backward) against the reference."""
    x, dt, A, B, C, D = inputs(L, seed=1)
    h0 = torch.randn(2, 6, 5, 4) if with_state else None
    leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    y1, h1 = ssd.ssd_scan(*leaves[:2], A, *leaves[2:], chunk_size=32, D=D, initial_state=h0)
    g1 = torch.autograd.grad((y1 * torch.cos(y1)).sum() + h1.sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    y2, h2 = ssd.ssd_scan_ref(*leaves2[:2], A, *leaves2[2:], chunk_size=32, D=D, initial_state=h0)
    g2 = torch.autograd.grad((y2 * torch.cos(y2)).sum() + h2.sum(), leaves2)
    assert maxdiff(y1, y2) < 1e-4 and maxdiff(h1, h2) < 1e-4
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() / (b.abs().max() + 1e-6) < 1e-4


def test_cpu_scan_equals_recurrence() -> None:
    x, dt, A, B, C, D = inputs(37, H=9, G=3, seed=7)
    h0 = torch.randn(2, 9, 5, 4)
    y, hT = ssd.ssd_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_state=h0)
    yn, hn = naive(x, dt, A, B, C, D, h0)
    assert maxdiff(y, yn) < 1e-4 and maxdiff(hT, hn) < 1e-4


def test_bf16_inputs_give_bf16_output_and_fp32_state() -> None:
    x, dt, A, B, C, D = inputs(20, seed=3, dtype=torch.bfloat16)
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=8, D=D)
    yn, hn = naive(x, dt, A, B, C, D)
    assert y.dtype == torch.bfloat16 and hT.dtype == torch.float32
    assert maxdiff(y, yn) < 5e-2 and maxdiff(hT, hn) < 1e-4  # the state is computed in fp32


def test_causal_conv_matches_conv1d_with_history() -> None:
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 6, 11, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    ref = F.silu(F.conv1d(F.pad(x, (3, 0)), w[:, None], b, groups=6))
    assert maxdiff(ssd.causal_conv1d(x, w, b), ref) < 1e-5
    hist = torch.randn(2, 6, 3, generator=g)
    ref2 = F.silu(F.conv1d(torch.cat([hist, x], -1), w[:, None], b, groups=6))
    assert maxdiff(ssd.causal_conv1d(x, w, b, hist), ref2) < 1e-5
    # one decode step: the window [history, x_t]
    ref3 = F.silu(F.conv1d(torch.cat([hist, x[..., :1]], -1), w[:, None], b, groups=6))
    assert maxdiff(ssd.causal_conv1d(x[..., :1], w, b, hist), ref3) < 1e-5
    ref4 = F.silu(F.conv1d(F.pad(x, (3, 0)), w[:, None], None, groups=6))
    assert maxdiff(ssd.causal_conv1d(x, w, None), ref4) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_fast_path_equals_reference(with_state: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ssd_scan on CUDA (mamba_ssm's kernel, head order permuted) against ssd_scan_ref; the kernel really ran."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if ssd._mamba_chunk_scan is None:  # ssd_scan would be the reference itself: nothing to compare
        pytest.skip("mamba_ssm is not installed (pip install nestlm[gpu])")
    calls, kernel = [], ssd._mamba_chunk_scan

    def spy(*a, **k):
        calls.append(a[0].shape)
        return kernel(*a, **k)

    monkeypatch.setattr(ssd, "_mamba_chunk_scan", spy)
    x, dt, A, B, C, D = (t.cuda() for t in inputs(300, H=8, G=2, P=16, N=16))
    h0 = torch.randn(2, 8, 16, 16, device="cuda") if with_state else None
    y, h = ssd.ssd_scan(x, dt, A, B, C, chunk_size=64, D=D, initial_state=h0)
    yr, hr = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=64, D=D, initial_state=h0)
    assert y.shape == yr.shape and h.shape == hr.shape
    assert maxdiff(y, yr) < 1e-3 and maxdiff(h, hr) < 1e-3
    xs, dts, Bs, Cs = (t[:, :37].cpu() for t in (x, dt, B, C))
    yn, hn = naive(xs, dts, A.cpu(), Bs, Cs, D.cpu(), None if h0 is None else h0.cpu())
    y37, h37 = ssd.ssd_scan(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], chunk_size=16, D=D, initial_state=h0)
    assert maxdiff(y37.cpu(), yn) < 1e-3 and maxdiff(h37.cpu(), hn) < 1e-3
    assert calls == [x.shape, x[:, :37].shape]  # both ssd_scan calls ran the kernel, not a fallback
