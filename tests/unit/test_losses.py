"""The chunked losses equal today's full-logit losses and their gradients (1e-5), IGNORE targets respected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlm.train.losses import IGNORE, Head, ce_loss, chunked_loss, kd_loss


def _inputs(seed: int, B: int = 2, L: int = 13, H: int = 16, Ht: int = 20, V: int = 97, ignore: bool = True):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(B, L, H, generator=g, requires_grad=True)
    s_w = (torch.randn(V, H + 4, generator=g) * 0.5).requires_grad_()  # wider than the student: a sliced hidden
    t_h = torch.randn(B, L, Ht, generator=g)
    t_w = torch.randn(V, Ht, generator=g) * 0.5
    y = torch.randint(0, V, (B, L), generator=g)
    if ignore:
        y[0, :5] = IGNORE  # a prompt
        y[1, -3:] = IGNORE  # padding
    return s_h, s_w, t_h, t_w, y


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs, retain_graph=True))


@pytest.mark.parametrize("chunk", [1, 5, 13, 26, 1000])
@pytest.mark.parametrize("ignore", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_equals_full_logits(chunk: int, ignore: bool, temperature: float) -> None:
    s_h, s_w, t_h, t_w, y = _inputs(chunk, ignore=ignore)
    ref = kd_loss(F.linear(s_h, s_w[:, :16]), F.linear(t_h, t_w), temperature, y)
    got = kd_loss(Head(s_h, s_w, chunk), Head(t_h, t_w, chunk), temperature, y)
    torch.testing.assert_close(got.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got, s_h, s_w), _grads(ref, s_h, s_w), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert s_w.shape[1] == 20  # the columns past the student's hidden get zero gradient, as with slicing
    assert (
        float(_grads(kd_loss(Head(s_h, s_w, chunk), Head(t_h, t_w, chunk), temperature, y), s_w)[0][:, 16:].abs().max())
        == 0
    )


@pytest.mark.parametrize("chunk", [3, 26])
def test_chunked_ce_and_kd_plus_ce_equal_full_logits(chunk: int) -> None:
    s_h, s_w, t_h, t_w, y = _inputs(7)
    s_logits, t_logits = F.linear(s_h, s_w[:, :16]), F.linear(t_h, t_w)
    ref_ce = ce_loss(s_logits, y)
    got_ce = ce_loss(Head(s_h, s_w, chunk), y)
    torch.testing.assert_close(got_ce, ref_ce, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got_ce, s_h, s_w), _grads(ref_ce, s_h, s_w), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = kd_loss(s_logits, t_logits, 1.0, y) + ce_loss(s_logits, y)  # the trainable-teacher mix
    got = chunked_loss(Head(s_h, s_w, chunk), Head(t_h, t_w, chunk), y, 1.0, kd_weight=1.0, ce_weight=1.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got, s_h, s_w), _grads(ref, s_h, s_w), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ignored_targets_change_nothing_and_a_broken_mask_is_caught() -> None:
    """Logits at IGNORE positions do not reach the loss or its gradients; counting them would."""
    s_h, s_w, t_h, t_w, y = _inputs(3)
    loss = kd_loss(Head(s_h, s_w, 4), Head(t_h, t_w, 4), 1.0, y)
    (g,) = _grads(loss, s_h)
    assert float(g[0, :5].abs().max()) == 0 and float(g[1, -3:].abs().max()) == 0
    unmasked = kd_loss(Head(s_h, s_w, 4), Head(t_h, t_w, 4), 1.0, None)  # what a chunked loss without the mask gives
    assert abs(float(unmasked.detach()) - float(loss.detach())) > 1e-3


def test_no_grad_and_loss_only() -> None:
    s_h, s_w, t_h, t_w, y = _inputs(5)
    with torch.no_grad():
        got = kd_loss(Head(s_h, s_w, 4), Head(t_h, t_w, 4), 1.0, y)
        ref = kd_loss(F.linear(s_h, s_w[:, :16]), F.linear(t_h, t_w), 1.0, y)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_model_head_equals_model_logits() -> None:
    """model(x, head=False) gives the hidden states the logits come from; the parameter gradients match."""
    import nestlm

    torch.manual_seed(0)
    cfg = nestlm.ModelConfig.from_pattern(
        "M-*",
        vocab_size=61,
        hidden_size=32,
        mamba_heads=4,
        mamba_head_dim=8,
        mamba_groups=2,
        d_state=8,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=8,
        ffn=48,
        mamba_chunk_size=8,
    )
    model = nestlm.HybridLM(cfg)
    x = torch.randint(0, 61, (2, 11))
    y = torch.randint(0, 61, (2, 11))
    y[0, :4] = IGNORE
    out = model(x, head=False)
    assert out.logits is None and out.hidden_states.shape == (2, 11, 32)
    ref = ce_loss(model(x).logits, y)
    got = ce_loss(Head(out.hidden_states, model.output_weight(), 5), y)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got, *params), _grads(ref, *params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
