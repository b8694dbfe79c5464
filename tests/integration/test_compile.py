"""Opt-in torch.compile (nestlm.compile_model, train.compile, --compile): no graph breaks, same numbers.

Every test traces the blocks with fullgraph=True (a graph break raises); most through a
counting backend that runs AOT autograd without generating code (aot_eager), so the forward
and the backward are captured without a C++ compiler. Default tier: Mamba, attention and MLP
blocks in training and at an elastic budget with the router's straight-through gates; results
equal the eager model's and blocks of one kind share their graphs. Slow tier (tens of seconds
each): gathered widths and a dropped layer, cached decode with and without padding, RoPE
attention, and the real thing (inductor, generated C++): compiled logits equal eager ones, and
train.compile gives the same losses over 5 steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nestlm.cache import InferenceCache
from nestlm.compiler import compile_model, is_compiled
from nestlm.config import ModelConfig
from nestlm.elastic.arch import ArchSpec
from nestlm.model import HybridLM
from nestlm.tap import Tap


class CountingBackend:
    """A torch.compile backend that records each captured graph and hands it to aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


class Gates(Tap):
    """Hard-mode router gates: straight-through factors (== 1) that carry gradient to ``p``."""

    def __init__(self, p: torch.Tensor, n_layers: int) -> None:
        self.p = p

        def st(v: torch.Tensor) -> torch.Tensor:
            return v / v.detach()

        self.hidden = st(p[0])
        self.layers = [st(p[1 + i]) for i in range(n_layers)]

    def embedding_gate(self) -> torch.Tensor:
        return self.hidden

    def block_gate(self, layer: int) -> torch.Tensor:
        return self.layers[layer]


def tiny(pattern: str = "M-*-M-*", **kw: Any) -> HybridLM:
    """Mamba (3 groups, chunk 8, so 20 tokens span 3 chunks), GQA attention and MLP blocks."""
    args = dict(
        vocab_size=97, hidden_size=48, mamba_heads=6, mamba_head_dim=8, mamba_groups=3, d_state=16,
        attn_heads=4, kv_heads=2, attn_head_dim=12, ffn=56, mamba_chunk_size=8,
    )  # fmt: skip
    args.update(kw)
    model = HybridLM(ModelConfig.from_pattern(pattern, **args))
    model.reset_parameters(seed=0)
    return model


@pytest.fixture(scope="module")
def pair(one_thread: None) -> tuple[HybridLM, HybridLM, CountingBackend]:
    torch._dynamo.reset()
    eager = tiny()
    backend = CountingBackend()
    compiled = compile_model(copy.deepcopy(eager), backend=backend, fullgraph=True)
    assert is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # same names: checkpoints unchanged
    return eager, compiled, backend


def grads(model: HybridLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model: HybridLM, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kw).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), grads(model)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


def test_training_blocks_have_no_graph_breaks_and_share_graphs(pair) -> None:
    eager, compiled, backend = pair
    eager.train()
    compiled.train()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    n0 = len(backend.graphs)
    ref, g_ref = step(eager, ids)
    got, g_got = step(compiled, ids)
    # 7 blocks of 3 kinds: one graph per kind, not per layer
    assert len(backend.graphs) - n0 == 3
    assert (got - ref).abs().max().item() <= 1e-5
    assert_close(g_got, g_ref, 1e-5)
    n1 = len(backend.graphs)
    step(compiled, ids)  # the same situation again: nothing new to compile
    assert len(backend.graphs) == n1


@pytest.mark.parametrize(
    "widths",
    [
        dict(hidden=40, mlp=32, mamba_heads=3, attn_heads=2),  # prefixes of every weight
        pytest.param(  # gathers, a dropped layer
            dict(hidden=32, mamba_head_dim=6, attn_heads=2, kv_heads=1, drop_layers=[2]), marks=pytest.mark.slow
        ),
    ],
    ids=["prefix", "gather-drop"],
)
def test_elastic_training_at_a_budget_compiles_fullgraph(pair, widths: dict[str, Any]) -> None:
    eager, compiled, _ = pair
    eager.train()
    compiled.train()
    cfg = eager.config
    spec = ArchSpec.full(cfg).replace(cfg, **widths)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    outs = []
    p0 = 0.5 + torch.rand(1 + cfg.n_layers, generator=torch.Generator().manual_seed(3))  # router probabilities
    for model in (eager, compiled):
        p = p0.clone().requires_grad_()
        logits, g = step(model, ids, arch=spec, tap=Gates(p, cfg.n_layers))
        outs.append((logits, g, p.grad.clone()))
    (ref, g_ref, p_ref), (got, g_got, p_got) = outs
    assert (got - ref).abs().max().item() <= 1e-5
    assert_close(g_got, g_ref, 1e-5)
    assert p_ref.abs().sum() > 0 and (p_got - p_ref).abs().max().item() <= 1e-5  # the router's gradient


@pytest.mark.slow
def test_cached_decode_compiles_fullgraph_and_matches(pair) -> None:
    eager, compiled, backend = pair
    eager.eval()
    compiled.eval()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 97, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row
    spec = ArchSpec.full(eager.config).replace(eager.config, hidden=40, mamba_heads=3, attn_heads=2)
    for kw in ({}, {"attention_mask": mask}, {"arch": spec}):
        a = eager.generate(prompt, max_new_tokens=12, eos_token_id=[], **kw)
        b = compiled.generate(prompt, max_new_tokens=12, eos_token_id=[], **kw)
        assert torch.equal(a, b), kw
    # decode does not compile per token: a longer KV buffer recompiles the attention block's prefill
    # and decode graphs once with a symbolic length, and then no length compiles anything new
    n = len(backend.graphs)
    compiled.generate(prompt, max_new_tokens=24, eos_token_id=[])
    assert len(backend.graphs) - n <= 2
    n = len(backend.graphs)
    b = compiled.generate(prompt, max_new_tokens=36, eos_token_id=[])
    assert len(backend.graphs) == n
    assert torch.equal(b, eager.generate(prompt, max_new_tokens=36, eos_token_id=[]))
    # and the cached logits step by step equal the uncached forward of the whole sequence
    with torch.no_grad():
        full = eager(b).logits
        cache = InferenceCache(eager.config.n_layers, capacity=b.shape[1])
        steps = [compiled(b[:, :11], cache=cache).logits]
        steps += [compiled(b[:, t : t + 1], cache=cache).logits for t in range(11, b.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_rope_attention_compiles_fullgraph(one_thread: None) -> None:
    """A Transformer parent's attention (RoPE, qk-norm) has no graph break either."""
    eager = tiny("*-*-", rope_theta=10000.0, attention_qk_norm=True)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    ref, g_ref = step(eager.train(), ids)
    got, g_got = step(compiled.train(), ids)
    assert (got - ref).abs().max().item() <= 1e-5
    assert_close(g_got, g_ref, 1e-5)
    p = ids[:, :6]
    assert torch.equal(
        eager.eval().generate(p, max_new_tokens=8, eos_token_id=[]),
        compiled.eval().generate(p, max_new_tokens=8, eos_token_id=[]),
    )


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        compile_model(tiny("M-"), backend="nope")


# ----------------------------------------------------------------------------- slow: inductor
def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


@pytest.mark.slow
def test_inductor_forward_equals_eager(one_thread: None) -> None:
    torch._dynamo.reset()
    eager = tiny().eval()
    compiled = compile_model(copy.deepcopy(eager))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (compiled(ids).logits - eager(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "elastic"])
def test_train_compile_gives_the_same_losses(tmp_path: Path, mode: str) -> None:
    from nestlm.train.recipe import load_recipe
    from nestlm.train.trainer import train

    torch._dynamo.reset()
    fast = ["data.max_bytes=60000", "stages.0.steps=5", "stages.1.steps=0", "train.checkpoint_every=0"]
    fast.append(f"train.mode={mode}")
    a, b = tmp_path / "eager", tmp_path / "compiled"
    train(load_recipe("tiny", fast), a, progress=False)
    train(load_recipe("tiny", fast + ["train.compile=true"]), b, progress=False)
    la, lb = [x["loss"] for x in rows(a)], [x["loss"] for x in rows(b)]
    print(f"{mode}: eager losses {la}\n{mode}: compiled losses {lb}")  # shown with pytest -s
    assert len(la) == len(lb) == 5
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= 1e-5, (la, lb)
    assert [x["budget"] for x in rows(a)] == [x["budget"] for x in rows(b)]
