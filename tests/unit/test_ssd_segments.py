"""Packed documents in the Mamba kernels: the scan and the conv with ``seq_idx`` equal each document alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlm import ssd
from tests.unit.test_ssd import inputs, maxdiff, naive

LENGTHS = [5, 13, 1, 20]  # across chunk boundaries of 8 (and a one-token document)


def seq_ids(lengths: list[int], b: int = 2) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), 3 * i + 1) for i, n in enumerate(lengths)])  # nondecreasing, not 0..n-1
    return ids[None].expand(b, -1).contiguous()


def alone(fn, x, dt, A, B, C, D, lengths):
    """Each document scanned on its own, from zero state; outputs concatenated, the last one's state."""
    ys, s = [], 0
    for n in lengths:
        y, h = fn(x[:, s : s + n], dt[:, s : s + n], A, B[:, s : s + n], C[:, s : s + n], 8, D)
        ys.append(y)
        s += n
    return torch.cat(ys, 1), h


@pytest.mark.parametrize("fn", [ssd.ssd_scan_ref, ssd.ssd_scan_chunked])
def test_scan_with_seq_idx_equals_each_document_alone(fn) -> None:
    L = sum(LENGTHS)
    x, dt, A, B, C, D = inputs(L, seed=11)
    y, h = fn(x, dt, A, B, C, 8, D, seq_idx=seq_ids(LENGTHS))
    ya, ha = alone(ssd.ssd_scan_ref, x, dt, A, B, C, D, LENGTHS)
    assert maxdiff(y, ya) < 1e-5 and maxdiff(h, ha) < 1e-5
    # and the float64 recurrence, reset at each start
    yn, s = [], 0
    for n in LENGTHS:
        yn.append(naive(x[:, s : s + n], dt[:, s : s + n], A, B[:, s : s + n], C[:, s : s + n], D)[0])
        s += n
    assert maxdiff(y, torch.cat(yn, 1)) < 1e-4


def test_scan_with_one_document_equals_no_seq_idx() -> None:
    x, dt, A, B, C, D = inputs(19, seed=2)
    h0 = torch.randn(2, 6, 5, 4)
    y0, h0_ = ssd.ssd_scan_ref(x, dt, A, B, C, 8, D, h0)
    for fn in (ssd.ssd_scan_ref, ssd.ssd_scan_chunked):
        y, h = fn(x, dt, A, B, C, 8, D, h0, seq_idx=torch.zeros(2, 19, dtype=torch.long))
        assert maxdiff(y, y0) < 1e-5 and maxdiff(h, h0_) < 1e-5  # the initial state continues the first document


def test_cpu_scan_with_seq_idx_equals_reference_with_grads() -> None:
    L = sum(LENGTHS)
    x, dt, A, B, C, D = inputs(L, seed=3)
    seq = seq_ids(LENGTHS)
    seq[1] = torch.cat([torch.zeros(17, dtype=torch.long), torch.ones(L - 17, dtype=torch.long)])  # rows differ

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]
        y, h = fn(*leaves[:2], A, *leaves[2:], 8, D, seq_idx=seq)
        return (y, h), torch.autograd.grad((y * torch.cos(y)).sum() + h.sum(), leaves)

    (y1, h1), g1 = run(ssd.ssd_scan)  # on CPU: ssd_scan_chunked
    (y2, h2), g2 = run(ssd.ssd_scan_ref)
    assert maxdiff(y1, y2) < 1e-5 and maxdiff(h1, h2) < 1e-5
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() / (b.abs().max() + 1e-6) < 1e-5


@pytest.mark.parametrize("impl", [ssd.causal_conv1d, ssd.causal_conv1d_ref])
def test_conv_with_seq_idx_equals_each_document_alone(impl) -> None:
    g = torch.Generator().manual_seed(3)
    L = sum(LENGTHS)
    x = torch.randn(2, L, 6, generator=g).transpose(1, 2).requires_grad_()  # (b, C, L), channel-last as the model
    w, b = torch.randn(6, 4, generator=g).requires_grad_(), torch.randn(6, generator=g)
    out = impl(x, w, b, seq_idx=seq_ids(LENGTHS))
    parts, s = [], 0
    for n in LENGTHS:
        parts.append(F.silu(F.conv1d(F.pad(x[..., s : s + n], (3, 0)), w[:, None], b, groups=6)))
        s += n
    ref = torch.cat(parts, -1)
    assert maxdiff(out, ref) < 1e-5
    gx, gw = torch.autograd.grad((out * out.cos()).sum(), [x, w])
    rx, rw = torch.autograd.grad((ref * ref.cos()).sum(), [x, w])
    assert maxdiff(gx, rx) < 1e-5 and maxdiff(gw, rw) < 1e-4


def test_conv_history_belongs_to_the_first_document() -> None:
    g = torch.Generator().manual_seed(4)
    x, w, b, hist = torch.randn(2, 6, 9, generator=g), torch.randn(6, 4), torch.randn(6), torch.randn(2, 6, 3)
    seq = torch.tensor([[0] * 4 + [1] * 5] * 2)
    first = ssd.causal_conv1d(x[..., :4], w, b, hist)
    second = ssd.causal_conv1d(x[..., 4:], w, b)
    for impl in (ssd.causal_conv1d, ssd.causal_conv1d_ref):
        assert maxdiff(impl(x, w, b, hist, seq_idx=seq), torch.cat([first, second], -1)) < 1e-5


@pytest.mark.gpu
def test_cuda_kernels_take_seq_idx() -> None:
    """With mamba_ssm / causal_conv1d installed: the kernels' seq_idx equals the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    L = sum(LENGTHS) * 5
    x, dt, A, B, C, D = (t.cuda() for t in inputs(L, H=8, G=2, P=16, N=16))
    seq = seq_ids(LENGTHS * 5).cuda()
    y, h = ssd.ssd_scan(x, dt, A, B, C, 64, D, seq_idx=seq)
    yr, hr = ssd.ssd_scan_ref(x, dt, A, B, C, 64, D, seq_idx=seq)
    assert maxdiff(y, yr) < 1e-3 and maxdiff(h, hr) < 1e-3
    xc = torch.randn(2, L, 32, device="cuda").transpose(1, 2)
    w, b = torch.randn(32, 4, device="cuda"), torch.randn(32, device="cuda")
    assert maxdiff(ssd.causal_conv1d(xc, w, b, seq_idx=seq), ssd.causal_conv1d_ref(xc, w, b, seq_idx=seq)) < 1e-3
