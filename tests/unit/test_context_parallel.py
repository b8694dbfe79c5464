"""Context parallelism's algebra in one process: the parts of a sequence run one after another through
``ContextGroup`` itself, with its all-gathers replaced by a log of what the earlier parts handed over.

The gloo test (tests/integration/test_context_parallel.py) runs the same forward over real collectives.
Here: every model kind, a nested budget, soft masks and packed documents, whose logits, input gradients
and parameter gradients over the parts equal one forward over the whole sequence.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nestlm.errors import NestlmError
from nestlm.model import HybridLM
from nestlm.train.context_parallel import ContextGroup, add_state, initial_state, state_summary
from nestlm.train.distributed import DistInfo
from nestlm.train.recipe import RecipeError, load_recipe
from tests.integration.cp_worker import Probe, cases, rel


class InOrder(ContextGroup):
    """``ContextGroup`` for parts run in order 0, 1, ... in one process: gather k of part c returns what
    gather k of parts 0..c got (the later parts as zeros, which no part reads), with its autograd graph."""

    def __init__(self, n: int) -> None:
        super().__init__(None, -1, n, DistInfo())
        self.log: dict[int, list[torch.Tensor]] = {}

    def next_part(self) -> InOrder:
        self.rank, self.calls = self.rank + 1, 0
        return self

    def gather_plain(self, t: torch.Tensor) -> torch.Tensor:
        got = self.log.setdefault(self.calls, [])
        self.calls += 1
        got.append(t)
        return torch.stack(got + [torch.zeros_like(t)] * (self.size - len(got)))

    gather = gather_plain


def over_parts(model, ids, weights, arch, masks, n, **kw):
    """Logits, first-block input gradients and parameter gradients of the parts run in order."""
    cg, taps, outs, probe_masks = InOrder(n), [], [], None
    L = ids.shape[1] // n
    for c in range(n):
        tap = Probe(model.config, masks)
        if probe_masks is None:
            probe_masks = tap.masks
        tap.masks = probe_masks  # one set of masks (router outputs) for every part
        part = {k: v[:, c * L : (c + 1) * L] for k, v in kw.items()}
        outs.append(model(ids[:, c * L : (c + 1) * L], arch=arch, tap=tap, context=cg.next_part(), **part).logits)
        taps.append(tap)
    logits = torch.cat(outs, 1)
    (logits * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    grads |= {f"mask.{k}": m.grad.clone() for k, m in probe_masks.items()}
    return logits.detach(), torch.cat([t.first.grad for t in taps], 1), grads


def whole(model, ids, weights, arch, masks, **kw):
    tap = Probe(model.config, masks)
    logits = model(ids, arch=arch, tap=tap, **kw).logits
    (logits * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    grads |= {f"mask.{k}": m.grad.clone() for k, m in tap.masks.items()}
    return logits.detach(), tap.first.grad, grads


def check(name: str, L: int, n: int, **kw) -> None:
    cfg, arch, masks = cases()[name]
    torch.manual_seed(0)
    ref = HybridLM(cfg)
    ref.reset_parameters(seed=1)
    parts = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(0, cfg.vocab_size, (2, L), generator=g)
    weights = torch.randn(2, L, cfg.vocab_size, generator=g)
    a = whole(ref, ids, weights, arch, masks, **kw)
    b = over_parts(parts, ids, weights, arch, masks, n, **kw)
    assert set(a[2]) == set(b[2])
    diffs = {"logits": rel(b[0], a[0]), "input": rel(b[1], a[1]), "params": max(rel(b[2][k], a[2][k]) for k in a[2])}
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("name", ["hybrid", "hybrid-moe", "llama", "nested-budget", "soft-masks"])
@pytest.mark.parametrize("L", [33, 12])  # parts of 11 (over a scan chunk of 8) and of 4 (within one)
def test_parts_in_order_equal_the_whole_sequence(name: str, L: int) -> None:
    check(name, L, 3)


@pytest.mark.parametrize("name", ["hybrid", "llama"])
def test_packed_documents_across_part_boundaries(name: str) -> None:
    # parts of 8: a document ends exactly at the first boundary, one runs over the second and third,
    # a one-token document, and row 1 is one document over every part
    seg = torch.tensor([[0] * 8 + [1] * 3 + [2] * 14 + [3] + [4] * 6, [5] * 32])
    check(name, 32, 4, segment_ids=seg)
    pos = torch.cat([torch.arange(8), torch.arange(3), torch.arange(14), torch.arange(1), torch.arange(6)])
    check(name, 32, 4, position_ids=torch.stack([pos, torch.arange(32)]))  # a 0 starts a document


def test_state_combine_is_the_recurrence() -> None:
    """initial_state unrolls h_{j+1} = keep_j a_j h_j + S_j; add_state is what the initial state adds to a scan."""
    from nestlm.ssd import ssd_scan

    torch.manual_seed(0)
    n, b, H, P, N, G, L = 4, 2, 4, 3, 5, 2, 7
    S, la = torch.randn(n, b, H, P * N), -torch.rand(n, b, H)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])[:, None, None].expand(n, b, H)
    h = torch.zeros(b, H, P * N)
    for c in range(n):
        assert torch.allclose(initial_state(S, la, keep, c), h, atol=1e-6)
        h = keep[c, ..., None] * la[c].exp()[..., None] * h + S[c]
    x, dt, B, C = torch.randn(b, L, H, P), torch.rand(b, L, H), torch.randn(b, L, G, N), torch.randn(b, L, G, N)
    A, h0 = -torch.rand(H), torch.randn(b, H, P, N)
    y, final = ssd_scan(x, dt, A, B, C, 4, initial_state=h0)
    y0, final0 = ssd_scan(x, dt, A, B, C, 4)
    cs = torch.cumsum(dt * A, 1)
    assert torch.allclose(add_state(y0, h0, cs, C), y, atol=1e-5)
    s = state_summary(final0, cs)  # the final state is affine in the initial one: a h0 + S
    assert torch.allclose(s[..., -2].exp()[..., None, None] * h0 + s[..., :-2].view(b, H, P, N), final, atol=1e-5)


def test_a_sequence_length_the_parts_do_not_divide_is_refused_in_one_line() -> None:
    with pytest.raises(RecipeError, match=r"seq_len 64 is not divisible by train.context_parallel 3$"):
        load_recipe("tiny", ["train.context_parallel=3"])
    with pytest.raises(NestlmError, match="shorter than the Mamba conv's window"):
        InOrder(2).next_part().conv_history(torch.zeros(1, 4, 2), 3)
