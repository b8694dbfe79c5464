"""Putting the server together: load a model directory, build the API, serve it with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MAX_CONTEXT = 4096
API_KEY_ENV = "NESTLM_API_KEY"


def default_max_context(model: Any) -> int:
    """The context the model's source config declares (max_position_embeddings), else 4096."""
    hf = model.config.hf_config or {}
    n = hf.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else DEFAULT_MAX_CONTEXT


def build_api(
    model_dir: str | Path,
    api_key: str | None = None,
    max_context: int | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    target_latency_ms: float = 100.0,
    device: str = "cpu",
    model: Any = None,
    compile: bool = False,
) -> Any:
    """Load ``model_dir`` (unless ``model`` is given) and return the :class:`~nestlm.serve.app.Api` over it."""
    from ..loading import load
    from ..tokenizer import load_tokenizer
    from .app import Api
    from .scheduler import Scheduler

    if model is None:
        model = load(model_dir, device=device)
    if compile:  # every block through torch.compile (nestlm.compile_model), in place
        from ..compiler import compile_model

        compile_model(model)
    tok = load_tokenizer(model_dir, required=False)
    sched = Scheduler(model, max_batch=max_batch, max_queue=max_queue, target_latency_ms=target_latency_ms)
    ctx = max_context if max_context is not None else default_max_context(model)
    name = Path(model_dir).resolve().name or "model"
    return Api(sched, tok, model_dir, ctx, name, api_key=api_key)


def run(api: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``api`` with uvicorn until interrupted."""
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(api), host=host, port=port, log_level=log_level)
