"""nestlm against transformers' NemotronH: logits, greedy generation, cached decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import NemotronHForCausalLM

import nestlm
from nestlm.cache import InferenceCache
from tests.conftest import make_hf

SHAPES = {
    "groups2-gqa-tied": dict(n_groups=2, num_key_value_heads=2, tie_word_embeddings=True),
    "groups1-mha-untied": dict(
        n_groups=1,
        num_key_value_heads=4,
        layers_block_type=["full_attention", "linear_attention", "linear_attention", "mlp"],
    ),
    "groups3-odd-widths": dict(
        hidden_size=45,
        mamba_num_heads=9,
        mamba_head_dim=7,
        n_groups=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=10,
        intermediate_size=37,
        ssm_state_size=12,
        layers_block_type=["linear_attention", "linear_attention", "full_attention", "mlp", "linear_attention"],
    ),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_hf(tmp_path_factory.mktemp(request.param) / "hf", **SHAPES[request.param])
    return NemotronHForCausalLM.from_pretrained(path).eval(), nestlm.load(path).eval()


@pytest.mark.parametrize("length", [1, 7, 129, 300])
def test_logits_match_transformers(pair, length: int) -> None:
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_generation_matches_transformers(pair) -> None:
    hf, ours = pair
    ids = torch.randint(3, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    a = hf.generate(ids, max_new_tokens=32, do_sample=False)
    b = ours.generate(ids, max_new_tokens=32)
    assert a.shape == b.shape == (1, 52)
    assert torch.equal(a, b)


def test_generation_with_eos_stops_like_transformers(tmp_path: Path) -> None:
    path = make_hf(tmp_path / "hf", eos_token_id=5, pad_token_id=0, vocab_size=12)
    hf, ours = NemotronHForCausalLM.from_pretrained(path).eval(), nestlm.load(path).eval()
    ids = torch.tensor([[3, 4, 6, 7, 8, 9, 3, 4], [9, 8, 7, 6, 3, 4, 9, 8]])
    a = hf.generate(ids, max_new_tokens=32, do_sample=False)
    b = ours.generate(ids, max_new_tokens=32)
    assert torch.equal(a, b)


def test_cached_decode_equals_uncached_forward(pair) -> None:
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ours(ids).logits
        cache = InferenceCache(ours.config.n_layers)
        errs = [(ours(ids[:, :20], cache=cache).logits - ref[:, :20]).abs().max().item()]
        errs.append((ours(ids[:, 20:27], cache=cache).logits - ref[:, 20:27]).abs().max().item())  # chunked prefill
        for t in range(27, 60):
            errs.append((ours(ids[:, t : t + 1], cache=cache).logits[:, 0] - ref[:, t]).abs().max().item())
    assert max(errs) <= 1e-4, max(errs)


def test_left_padded_batch_generates_what_each_prompt_does_alone(pair) -> None:
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, ours.config.vocab_size, (n,), generator=g) for n in (5, 23, 14)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p) :], mask[r, L - len(p) :] = p, 1
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=16)
    for r, p in enumerate(prompts):
        alone = ours.generate(p[None], max_new_tokens=16)
        assert torch.equal(batch[r, L:], alone[0, len(p) :]), r
