"""Inference state per layer: a KV cache for attention, conv + SSM state for Mamba.

A cache is created empty and filled by the first forward (prefill); each later
forward appends. Widths follow whatever sub-network ran the prefill, so a cache
made at one budget must be used at that budget. ``SequencePart`` (at the end) is the same
kind of state handed to a training forward over one part of every sequence (context parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class AttentionState:
    """Keys and values of the tokens seen so far, in buffers that grow by doubling."""

    k: torch.Tensor  # (B, kv_heads, capacity, head_dim)
    v: torch.Tensor
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        need = self.length + n
        if need > self.k.shape[2]:
            cap = max(need, 2 * self.k.shape[2])
            grow = (self.k.shape[0], self.k.shape[1], cap - self.k.shape[2], self.k.shape[3])
            self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=2)
            self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=2)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]


@dataclass
class MambaState:
    """The last K-1 inputs of the causal conv (x, B, C channels) and the SSM state."""

    conv: torch.Tensor  # (B, conv channels, K-1)
    ssm: torch.Tensor  # (B, heads, head_dim, d_state), fp32
    # With InferenceCache.keep_steps: (conv, ssm) after each token of the last forward, to roll back
    # to (speculative decoding): conv (B, L, channels, K-1), ssm an ssd.SSMSteps (``.at(t)``).
    steps: tuple[torch.Tensor, Any] | None = None


class InferenceCache:
    """Per-layer decode state plus the padding mask of every token seen so far."""

    def __init__(self, n_layers: int, capacity: int = 0) -> None:
        self.layers: list[AttentionState | MambaState | None] = [None] * n_layers
        self.capacity = capacity  # initial KV buffer length (prompt + new tokens, if known)
        self.offset = 0  # tokens already in the cache
        self.key_mask: torch.Tensor | None = None  # (B, offset) bool, True = real token
        self.keep_steps = False  # Mamba layers keep their state after every token (MambaState.steps)

    def __len__(self) -> int:
        return self.offset

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only batch rows ``index`` (e.g. to drop finished sequences)."""
        for st in self.layers:
            if isinstance(st, AttentionState):
                st.k, st.v = st.k[index], st.v[index]
            elif isinstance(st, MambaState):
                st.conv, st.ssm = st.conv[index], st.ssm[index]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]


class SequencePart(Protocol):
    """What a forward over one contiguous part of every sequence needs of the parts before it.

    Context parallelism (train/context_parallel.py) cuts each sequence into N parts over N ranks and
    runs ``HybridLM.forward(part, context=...)`` on each. What a part needs of the earlier ones is what
    a decode needs of its cache: the position it starts at, attention's keys and values, the causal
    conv's last inputs and the SSM state. These methods hand over exactly that, so the model holds no
    communication code. They are collectives: every rank of the group calls each of them in the same
    order (the model's fixed layer order gives it), and differentiable (gradients flow back to the
    ranks that computed what was handed over).
    """

    def offset(self, length: int) -> int:
        """Position in its sequence of this part's first token (every part holds ``length`` tokens)."""
        ...

    def prefix(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token values of this part (B, L), e.g. segment ids -> those of the sequence from its start to
        this part's end (B, offset + L). No gradient."""
        ...

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This part's keys and values (B, kv_heads, L, head_dim) -> those of the sequence from its start
        to this part's end (B, kv_heads, offset + L, head_dim)."""
        ...

    def conv_history(self, x: torch.Tensor, width: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The causal conv's inputs (B, C, L) -> the ``width`` inputs just before this part (B, C, width),
        zeros before the sequence's start; with document ids ``seq_idx`` (B, L, numbered over the whole
        sequence), zeros where they are not of this part's first document."""
        ...

    def add_initial_state(
        self,
        y: torch.Tensor,
        final: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        C: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The SSD scan's output y (B, L, H, P) and final state (B, H, P, N), both from a zero initial
        state, with its dt (B, L, H), A (H,) and C (B, L, G, N) -> y plus what the true initial state
        h0 (the state the earlier parts leave) adds: C_t . h0 exp(sum_{s<=t} dt_s A), per head; with
        document ids ``seq_idx``, only where position t is of the document h0 belongs to."""
        ...
