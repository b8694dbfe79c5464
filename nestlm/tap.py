"""Tap: the one object through which training reaches inside a forward call.

Importance estimation reads named activations through it; router training replaces them
with soft masks and multiplies block outputs by straight-through gates. The model hands
it to every block (``HybridLM.forward(tap=...)``); see model.py's docstring for why this is
an explicit argument and not forward hooks or a wrapper.
"""

from __future__ import annotations

import torch


class Tap:
    """Training-time access to one forward call; the default changes nothing.

    activation(layer, name, t): sees a named activation and returns it or a replacement.
        Names: "norm" (a block's pre-norm output, (B, L, hidden)), "mamba_x" (the x part of
        in_proj's output, (B, L, H*P)), "attn_out" (the input of o_proj, (B, L, nq*hd)),
        "mlp_act" (neuron activations, (B, L, ffn)), "mamba_heads" (ones (H*P,); a replacement
        is a soft mask on the scan's output per head channel, which also leaves the masked
        channels out of the gated group norm's mean, as slicing the heads does),
        "moe_act" (routed-expert neuron activations, (T*k, ffn)), "moe_experts" (ones (E,); a
        replacement masks experts on selection: one masked to 0 is never chosen).
    hidden_mask(): a soft mask (hidden,) of the hidden channels, or None: it multiplies the
        embedding and every block's output, and every RMSNorm normalises over the kept share of
        the channels, so that a 0/1 mask runs exactly the sliced hidden size.
    embedding_gate(): a factor on the embedding output, or None.
    block_gate(layer): a factor on the block's output, or None. In hard-mask router training
        these are straight-through factors equal to 1.0, so the forward is exactly the
        sliced one while the task loss reaches the router.
    """

    def activation(self, layer: int, name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def embedding_gate(self) -> torch.Tensor | None:
        return None

    def hidden_mask(self) -> torch.Tensor | None:
        return None

    def block_gate(self, layer: int) -> torch.Tensor | None:
        return None
