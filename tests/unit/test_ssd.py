"""The SSD scan against a naive per-timestep recurrence; fast CPU path and decode step against the reference."""

from __future__ import annotations

import pytest
import torch

from nestlm import ssd


def naive(x, dt, A, B, C, D, h0=None):
    """h <- exp(dt A) h + dt B x;  y = C h + D x; head j reads group j % G."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    g = torch.arange(H) % G
    h = torch.zeros(b, H, P, N, dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(L):
        Bt, Ct = B[:, t, g].double(), C[:, t, g].double()  # (b, H, N)
        dA = torch.exp(dt[:, t].double() * A.double())  # (b, H)
        h = h * dA[..., None, None] + (
            dt[:, t].double()[..., None, None] * x[:, t].double()[..., None] * Bt[:, :, None]
        )
        ys.append((h * Ct[:, :, None]).sum(-1) + D.double()[:, None] * x[:, t].double())
    return torch.stack(ys, 1), h


def inputs(L, H=6, G=2, P=5, N=4, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=g) - 1)
    A = -torch.rand(H, generator=g) - 0.2
    B = torch.randn(b, L, G, N, generator=g)
    C = torch.randn(b, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("L", [1, 7, 16, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_scan_equals_recurrence(L: int, with_state: bool) -> None:
    x, dt, A, B, C, D = inputs(L)
    h0 = torch.randn(2, 6, 5, 4) if with_state else None
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=8, D=D, initial_state=h0)
    yn, hn = naive(x, dt, A, B, C, D, h0)
    assert (y.double() - yn).abs().max() < 1e-4
    assert (hT.double() - hn).abs().max() < 1e-4


@pytest.mark.parametrize("L", [5, 64, 130])
def test_cpu_scan_equals_reference_with_grads(L: int) -> None:
    x, dt, A, B, C, D = inputs(L, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    y1, h1 = ssd.ssd_scan(*leaves[:2], A, *leaves[2:], chunk_size=32, D=D)
    g1 = torch.autograd.grad((y1 * torch.cos(y1)).sum() + h1.sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (x, dt, B, C)]
    y2, h2 = ssd.ssd_scan_ref(*leaves2[:2], A, *leaves2[2:], chunk_size=32, D=D)
    g2 = torch.autograd.grad((y2 * torch.cos(y2)).sum() + h2.sum(), leaves2)
    assert (y1 - y2).abs().max() < 1e-4 and (h1 - h2).abs().max() < 1e-4
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() / (b.abs().max() + 1e-6) < 1e-4


def test_step_repeated_equals_scan() -> None:
    x, dt, A, B, C, D = inputs(9, seed=2)
    y, hT = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=4, D=D)
    h = torch.zeros(2, 6, 5, 4)
    for t in range(9):
        yt, h = ssd.ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert (yt - y[:, t]).abs().max() < 1e-4
    assert (h - hT).abs().max() < 1e-4


def test_segsum() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    s = ssd.segsum(x)
    assert s[2, 0] == 5.0 and s[2, 2] == 0.0 and s[1, 0] == 2.0
    assert torch.isinf(s[0, 1]) and s[0, 1] < 0


def test_causal_conv_matches_conv1d_with_history() -> None:
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 6, 11, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    ref = torch.nn.functional.silu(
        torch.nn.functional.conv1d(torch.nn.functional.pad(x, (3, 0)), w[:, None], b, groups=6)
    )
    assert (ssd.causal_conv1d(x, w, b) - ref).abs().max() < 1e-5
    hist = torch.randn(2, 6, 3, generator=g)
    ref2 = torch.nn.functional.silu(torch.nn.functional.conv1d(torch.cat([hist, x], -1), w[:, None], b, groups=6))
    assert (ssd.causal_conv1d(x, w, b, hist) - ref2).abs().max() < 1e-5


@pytest.mark.gpu
def test_cuda_fast_path_equals_reference() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x, dt, A, B, C, D = (t.cuda() for t in inputs(300, H=8, G=2, P=16, N=16))
    y, h = ssd.ssd_scan(x, dt, A, B, C, chunk_size=64, D=D)
    yr, hr = ssd.ssd_scan_ref(x, dt, A, B, C, chunk_size=64, D=D)
    assert (y - yr).abs().max() < 1e-3 and (h - hr).abs().max() < 1e-3
