"""Batch plumbing of the scheduler: joining and trimming per-row inference caches, and the
latency figures ``model: "auto"`` decides on, and the logprob entries of a token.

Rows of one batch have different context lengths: their KV caches are right-aligned (left
padding) with a key mask of real tokens, the layout ``model.generate`` uses for a left-padded
batch; the Mamba state of a row is its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..cache import AttentionState, InferenceCache, MambaState


def _row_caches_join(batch: InferenceCache, new: InferenceCache) -> InferenceCache:
    """One cache of the rows of ``batch`` then those of ``new``, right-aligned, with a key mask.

    Key column j of a row holds a real token iff key_mask[row, j]; columns are aligned at the
    end (the token being decoded), the layout of a left-padded batch.
    """
    ta, tb = batch.offset, new.offset
    T = max(ta, tb)
    out = InferenceCache(len(batch.layers))
    out.offset = T

    def mask_of(c: InferenceCache, t: int) -> torch.Tensor:
        n = _rows(c)
        m = c.key_mask if c.key_mask is not None else torch.ones(n, t, dtype=torch.bool, device=_device(c))
        return torch.cat([m.new_zeros(n, T - t), m], dim=1)

    out.key_mask = torch.cat([mask_of(batch, ta), mask_of(new, tb)], dim=0)
    for i, (a, b) in enumerate(zip(batch.layers, new.layers, strict=True)):
        if isinstance(a, AttentionState):
            cap = T + 64
            k = a.k.new_zeros(a.k.shape[0] + b.k.shape[0], a.k.shape[1], cap, a.k.shape[3])
            v = torch.zeros_like(k)
            na = a.k.shape[0]
            k[:na, :, T - ta : T], v[:na, :, T - ta : T] = a.k[:, :, :ta], a.v[:, :, :ta]
            k[na:, :, T - tb : T], v[na:, :, T - tb : T] = b.k[:, :, :tb], b.v[:, :, :tb]
            out.layers[i] = AttentionState(k, v, T)
        elif isinstance(a, MambaState):
            out.layers[i] = MambaState(torch.cat([a.conv, b.conv]), torch.cat([a.ssm, b.ssm]))
        else:
            out.layers[i] = None
    return out


def _rows(c: InferenceCache) -> int:
    if c.key_mask is not None:
        return c.key_mask.shape[0]
    for st in c.layers:
        if isinstance(st, AttentionState):
            return st.k.shape[0]
        if isinstance(st, MambaState):
            return st.ssm.shape[0]
    return 1


def _device(c: InferenceCache) -> torch.device:
    for st in c.layers:
        if isinstance(st, AttentionState):
            return st.k.device
        if isinstance(st, MambaState):
            return st.ssm.device
    return torch.device("cpu")


def _trim_left(c: InferenceCache) -> None:
    """Drop key columns that are padding in every row (after rows left), so contexts stay short."""
    if c.key_mask is None or c.offset == 0:
        return
    real = c.key_mask.any(dim=0)
    first = int(real.nonzero()[0]) if bool(real.any()) else c.offset
    if first == 0:
        return
    for st in c.layers:
        if isinstance(st, AttentionState):
            st.k, st.v = st.k[:, :, first:], st.v[:, :, first:]
            st.length -= first
    c.key_mask = c.key_mask[:, first:]
    c.offset -= first


# -------------------------------------------------------------------- latency
class LatencyTracker:
    """Recent per-token latency of each budget, and the ``auto`` choice made from it.

    A sample is the time between two consecutive decode steps of a budget's batch: what a row
    of that batch waits per token under the load of that moment (its own step, the other
    budgets' steps interleaved with it, prefills of joining requests), recorded with the number
    of rows the server was decoding then. The estimate of a budget for a new request is the
    mean of its samples of the last ``window_s`` seconds, scaled by the load the request will
    meet (rows decoding once it joins) over the mean load of those samples: a spike of arrivals
    steps down at once, before its latency has been measured. A budget with no recent sample is
    estimated from the measured budget nearest in size, scaled by the ratio of active
    parameters; with nothing measured recently (an idle server) every budget meets the target,
    so the largest answers. ``clock`` is injectable so that tests can drive it.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        target_ms: float,
        window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sizes = dict(sorted(sizes.items(), key=lambda kv: -kv[1]))  # largest first
        self.target_ms = target_ms
        self.window_s = window_s
        self.clock = clock
        self.samples: dict[str, deque[tuple[float, float, int]]] = {b: deque() for b in sizes}
        self.lock = threading.Lock()

    def record(self, budget: str, seconds: float, rows: int = 1) -> None:
        with self.lock:
            self.samples[budget].append((self.clock(), seconds, max(1, rows)))

    def _recent(self, budget: str) -> tuple[float, float] | None:
        """(mean seconds, mean rows) of ``budget``'s samples in the window, or None."""
        now = self.clock()
        with self.lock:
            q = self.samples[budget]
            while q and now - q[0][0] > self.window_s:
                q.popleft()
            if not q:
                return None
            return sum(s for _, s, _ in q) / len(q), sum(r for _, _, r in q) / len(q)

    def recent_ms(self, budget: str) -> float | None:
        """Mean per-token latency of ``budget`` over the window, in ms (None: no recent sample)."""
        r = self._recent(budget)
        return None if r is None else 1000.0 * r[0]

    def estimate_ms(self, budget: str, load: int | None = None) -> float | None:
        """Per-token latency ``budget`` would give a request that joins when ``load`` rows decode
        (None: at the load the samples were taken under)."""
        measured = {b: r for b in self.sizes if (r := self._recent(b)) is not None}
        if not measured:
            return None
        near = budget if budget in measured else min(measured, key=lambda b: abs(self.sizes[b] - self.sizes[budget]))
        seconds, rows = measured[near]
        ms = 1000.0 * seconds * self.sizes[budget] / self.sizes[near]
        return ms if load is None else ms * load / rows

    def choose(self, load: int | None = None) -> str:
        """The largest budget whose estimated per-token latency meets the target (else the smallest)."""
        names = list(self.sizes)
        for b in names:
            est = self.estimate_ms(b, load)
            if est is None or est <= self.target_ms:
                return b
        return names[-1]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch (B, L) and its attention mask (1 on real tokens), as
    ``model.generate`` takes a batch."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    return ids, mask


def logprob_info(lp: torch.Tensor, tok: int, top: int) -> dict[str, Any]:
    """logprob of ``tok`` under the log-probabilities ``lp`` (V,), and the ``top`` most likely tokens."""
    out: dict[str, Any] = {"logprob": float(lp[tok]), "top": []}
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.shape[-1]))
        out["top"] = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return out
