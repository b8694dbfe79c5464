"""nestlm serve on a Transformer parent (RoPE): concurrent requests of different lengths, batched
together, each equal to its solo greedy result (every row keeps its own positions)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import nestlm
from nestlm.serve.server import build_api
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server
from tests.transformer_models import make_transformer
from tests.unit.test_scheduler import solo

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_transformer(
        tmp_path_factory.mktemp("llama") / "llama",
        "llama",
        vocab_size=TOK.vocab_size,
        rope={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    (d / "nestlm_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    return d


def test_llama_parent_concurrent_requests_equal_solo(llama_dir: Path, one_thread) -> None:
    model = nestlm.load(llama_dir).eval()
    assert model.budgets == [] and model.config.rope_scaling  # a plain Transformer parent, llama3 RoPE
    server = Server(build_api(llama_dir, max_context=256))
    try:
        (name,) = [m.id for m in server.client().models.list()]
        jobs = [(f"{i}:" + "xyz " * (i % 7), 5 + i % 9) for i in range(12)]  # prompts of 2 to 26 tokens
        start = threading.Barrier(len(jobs))
        c = server.client()

        def one(job):
            prompt, n = job
            start.wait()
            return c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)

        before = server.health()["scheduler"]
        with ThreadPoolExecutor(len(jobs)) as ex:
            results = list(ex.map(one, jobs))
        for (prompt, n), r in zip(jobs, results, strict=True):
            want = TOK.decode(solo(model, TOK.encode(prompt), None, n, eos=None))
            assert r.choices[0].text == want, prompt
        after = server.health()["scheduler"]
        assert after["multi_row_steps"] - before["multi_row_steps"] > 0  # rows of different lengths decoded together
    finally:
        server.close()
