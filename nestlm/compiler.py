"""Opt-in ``torch.compile`` of a HybridLM, one block at a time.

``compile_model(model)`` compiles every block of ``model`` in place (``nn.Module.compile``):
parameter names, ``state_dict`` keys and checkpoints stay exactly as they are, and every
caller (training, ``generate``, the server's scheduler, evaluation) runs the compiled blocks
without knowing. The embedding, the final norm and the LM head stay eager.

Why per block and not the whole model: ``HybridLM.forward`` has data-dependent Python
(padding masks checked with ``bool(...)``, dropped layers, the cache's bookkeeping) that
would break a whole-model graph, while a block's code is straight-line tensor work. Every
block runs the same ``Block.forward`` code, so blocks of one kind and shape share their
compiled graphs: a model compiles one graph per kind of block (Mamba, attention, MLP) and
per situation (training, no-grad, prefill, decode, each elastic width first seen) rather
than one per layer. ``torch._dynamo``'s recompile limit (8 per code object by default) is
raised to ``RECOMPILE_LIMIT`` so that these situations do not fall back to eager.

Shapes: ``dynamic=None`` (torch's default) compiles for the first shapes seen and
recompiles once with symbolic sizes when a size changes (decode's growing KV cache, a
second sequence length), so decode does not recompile per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

RECOMPILE_LIMIT = 64  # compiled variants of Block.forward kept before dynamo falls back to eager
BACKENDS = ("inductor", "aot_eager", "eager")  # inductor: the fast one; the others trace only (tests)


def _raise_recompile_limit(limit: int) -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)


def compile_model(
    model: Any,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
) -> Any:
    """Compile each block of ``model`` (a HybridLM) with ``torch.compile``, in place; returns ``model``.

    backend: "inductor" (generated C++ on CPU, Triton on CUDA; needs a C++ compiler), or
        "aot_eager" / "eager", which trace without generating code (graph-break checks), or a
        torch.compile backend callable.
    mode: torch.compile's mode ("reduce-overhead", "max-autotune", ...), None for the default.
    fullgraph: raise on a graph break instead of splitting the block (the tests use it).
    dynamic: torch.compile's ``dynamic`` (None: static first, symbolic after a size change).

    Results equal the eager model's up to floating-point reassociation (fp32: <= 1e-5 on the
    logits in the tests). Compiling costs time on each new situation (seconds to minutes on a
    small CPU); it pays off over many steps of the same shapes.
    """
    if isinstance(backend, str) and backend not in BACKENDS:
        raise ValueError(f"unknown torch.compile backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _raise_recompile_limit(RECOMPILE_LIMIT)
    for block in model.layers:
        block.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    return model


def is_compiled(model: Any) -> bool:
    """Whether every block of ``model`` runs compiled (``compile_model`` was applied)."""
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)


__all__ = ["BACKENDS", "RECOMPILE_LIMIT", "compile_model", "is_compiled"]
