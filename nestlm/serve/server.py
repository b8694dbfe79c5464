"""Putting the server together: load a model directory, build the API, serve it with uvicorn.

:func:`bind` takes the address first (a taken port is a one-line error before the model loads);
:func:`run` serves on that socket and calls ``on_ready`` only once it is listening.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NestlmError

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
    log_prompts: bool = False,
    chat_template: str | Path | None = None,
) -> Any:
    """Load ``model_dir`` (unless ``model`` is given) and return the :class:`~nestlm.serve.app.Api` over it."""
    from ..loading import load
    from ..tokenizer import load_tokenizer
    from .app import Api
    from .scheduler import Scheduler

    template = None
    if chat_template is not None:  # read before the model loads: a bad path is one line, at once
        try:
            template = Path(chat_template).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise NestlmError(f"--chat-template {chat_template} cannot be read ({e}); give a Jinja file") from None
    if model is None:
        model = load(model_dir, device=device)
    if compile:  # every block through torch.compile (nestlm.compile_model), in place
        from ..compiler import compile_model

        compile_model(model)
    tok = load_tokenizer(model_dir, required=False)
    sched = Scheduler(model, max_batch=max_batch, max_queue=max_queue, target_latency_ms=target_latency_ms)
    ctx = max_context if max_context is not None else default_max_context(model)
    name = Path(model_dir).resolve().name or "model"
    return Api(sched, tok, model_dir, ctx, name, api_key=api_key, log_prompts=log_prompts, chat_template=template)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (listening starts when the server does). A taken port, a port
    this user may not take, or an address not of this machine is a one-line NestlmError."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
    except socket.gaierror as e:
        raise NestlmError(f"cannot listen on {where}: the host {host!r} does not resolve ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port can be taken again
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: f"port {port} is in use (another server?); stop it or give another --port",
            errno.EACCES: f"permission denied for port {port} (ports below 1024 need privileges); give another --port",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; give another --host",
        }.get(e.errno, e.strerror or str(e))
        raise NestlmError(f"cannot listen on {where}: {why}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (the real port when 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def access_log_to_stderr() -> None:
    """The access log (nestlm.serve.metrics) as timestamped lines on stderr."""
    log = logging.getLogger("nestlm.serve.access")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(
    api: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    sock: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``api`` with uvicorn on ``sock`` (else on ``host:port``, bound here) until interrupted;
    ``on_ready()`` once the socket is listening and the scheduler runs."""
    import uvicorn

    from .app import create_app

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit and on_ready is not None:
                on_ready()

    sock = sock if sock is not None else bind(host, port)
    _Server(uvicorn.Config(create_app(api), log_level=log_level)).run(sockets=[sock])
