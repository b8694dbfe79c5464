"""The serving tests' shared pieces: a real uvicorn server in a thread of the test process.

Their fixtures (``model_dir``, ``model``, ``server``: one small elastic model, served) are in conftest.py."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import uvicorn

from nestlm.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an Api in a thread of this process (so tests can read the scheduler's counters)."""

    def __init__(self, api) -> None:
        self.api = api
        self.port = free_port()
        cfg = uvicorn.Config(create_app(api), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
