"""``nestlm.load(dir)(ids).logits`` equals transformers' NemotronH logits (fp32, CPU, 1e-4 max abs).

Random NemotronH models are made with transformers' own NemotronHConfig and saved with
save_pretrained; shapes cover 1, 2, 3 and 6 Mamba groups (one head per group), GQA, MHA
and MQA attention, tied and untied heads, every bias transformers has, a stack that starts
with attention, one with only Mamba layers and one with none, and widths that are not
powers of two; sequences of 1, 7, 129 and 300 tokens run over chunks of 16 or 32.
"""

from __future__ import annotations

import pytest
import torch
from transformers import NemotronHForCausalLM

import nestlm
import nestlm.interop.nemotron_h as nh
from tests.conftest import ODD_WIDTHS, A, F, M, hf_logits, make_hf

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    # the default of make_hf: [M, -, *, M, -], 2 groups, GQA 4/2, chunk 16
    "g2-gqa-tied": dict(tie=True),
    "g1-mha-attn-first-biases": dict(
        n_groups=1,
        num_key_value_heads=4,
        layers_block_type=[A, M, M, F],
        chunk_size=32,
        mlp_bias=True,
        use_bias=True,  # Mamba in_proj / out_proj bias
    ),
    "g3-odd-widths": dict(
        **ODD_WIDTHS,
        vocab_size=97,
        layers_block_type=[M, M, A, F, M],
    ),
    "g6-mamba-only-noconvbias-k3": dict(
        layers_block_type=[M, M, M],
        mamba_num_heads=6,
        n_groups=6,
        use_conv_bias=False,
        conv_kernel=3,
        chunk_size=32,
    ),
    "mqa-no-mamba": dict(layers_block_type=[F, A, F, A], num_attention_heads=6, num_key_value_heads=1, head_dim=8),
}
LENGTHS = [1, 7, 129, 300]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_hf(tmp_path_factory.mktemp(request.param) / "hf", seed=len(request.param), **SHAPES[request.param])
    return NemotronHForCausalLM.from_pretrained(path).eval(), nestlm.load(path).eval(), path


def _ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_load_reads_the_shape(pair) -> None:
    hf, ours, _ = pair
    c = hf.config
    kinds = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp"}
    assert [ls.kind for ls in ours.config.layers] == [kinds[t] for t in c.layers_block_type]
    assert ours.config.hidden_size == c.hidden_size and ours.config.vocab_size == c.vocab_size
    for ls in ours.config.layers:
        if ls.kind == "mamba":
            assert (ls.heads, ls.head_dim, ls.groups, ls.d_state) == (
                c.mamba_num_heads,
                c.mamba_head_dim,
                c.n_groups,
                c.ssm_state_size,
            )
        elif ls.kind == "attention":
            assert (ls.heads, ls.kv_heads, ls.head_dim) == (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    tied = torch.equal(hf.lm_head.weight, hf.model.embeddings.weight)
    assert ours.config.tie_embeddings == tied and (ours.lm_head is None) == tied
    n_hf = sum(p.numel() for p in hf.parameters()) - (hf.lm_head.weight.numel() if tied else 0)
    assert ours.num_parameters() == n_hf


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(pair, length: int) -> None:
    hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, 2, length, seed=length)
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        out = ours(ids).logits
    assert out.shape == ref.shape == (2, length, hf.config.vocab_size) and out.dtype == torch.float32
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_last_logits_only_and_batch_rows_are_independent(pair) -> None:
    """num_logits=1 gives the last position's logits; a row's logits do not depend on the other rows."""
    hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, 3, 40, seed=5)
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, num_logits=1).logits
        alone = ours(ids[1:2]).logits
    assert last.shape == (3, 1, hf.config.vocab_size)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5
    assert (alone[0] - full[1]).abs().max().item() <= 1e-5


def _dt(hf, ids: torch.Tensor) -> torch.Tensor:
    """softplus(dt + dt_bias) of transformers' first layer (a Mamba one), unclamped."""
    layer = hf.model.layers[0]
    with torch.no_grad():
        proj = layer.mixer.in_proj(layer.norm(hf.model.embeddings(ids)))
        return torch.nn.functional.softplus(proj[..., -hf.config.mamba_num_heads :] + layer.mixer.dt_bias)


def test_dt_below_time_step_min_runs_unclamped_as_in_transformers(tmp_path) -> None:
    """transformers >= 5.25 clamps dt with time_step_limit ((0, inf) by default), not at time_step_min:
    on a model where dt runs below time_step_min, prefill logits agree at 1e-4."""
    path = make_hf(tmp_path / "hf")
    hf, ours = NemotronHForCausalLM.from_pretrained(path).eval(), nestlm.load(path).eval()
    ids = _ids(hf.config.vocab_size, 2, 40, seed=0)
    assert (_dt(hf, ids) < hf.config.time_step_min).float().mean().item() > 0.05  # the case is exercised
    assert list(ours.config.mamba_dt_limit) == [0.0, float("inf")]
    with torch.no_grad():
        assert (ours(ids).logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("breakage", ["no-head-permutation", "dt-clamped-at-time_step_min", "time_step_limit-ignored"])
def test_the_tolerance_catches_real_mistakes(tmp_path, breakage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1e-4 tolerance is not loose: plausible bugs move these logits by far more than it."""
    limit = {"time_step_limit": (5e-3, 5e-2)} if breakage == "time_step_limit-ignored" else {}
    path = make_hf(tmp_path / "hf", **limit)
    hf = NemotronHForCausalLM.from_pretrained(path).eval()
    if breakage == "no-head-permutation":  # HF's group-major head order taken as nestlm's rank-major one
        monkeypatch.setattr(nh, "permute_heads", lambda cfg, sd, to_nestlm: dict(sd))
    broken = nestlm.load(path).eval()
    for block in broken.layers:
        if block.kind == "mamba" and breakage == "dt-clamped-at-time_step_min":  # what releases < 5.25 did
            block.mixer.dt_limit = (hf.config.time_step_min, float("inf"))
        elif block.kind == "mamba" and breakage == "time_step_limit-ignored":
            block.mixer.dt_limit = (0.0, float("inf"))
    ids = _ids(hf.config.vocab_size, 2, 40, seed=0)
    with torch.no_grad():
        diff = (broken(ids).logits - hf_logits(hf, ids)).abs().max().item()
    assert diff > 1e-3, diff  # ten times the tolerance (observed: ~2e-2 and ~2)
