"""Importance estimation and reordering: the function is unchanged, and the ranking is right.

* reorder(model, estimate_importance(model, batches)) leaves the logits unchanged (fp32, 1e-5)
  for NemotronH-style models (several Mamba groups, GQA, tied and untied embeddings), a model
  loaded from a transformers NemotronH checkpoint, and SwiGLU / bias / RoPE variants;
* units made important on purpose (scaled MLP neurons, a KV group, a sharp query head, Mamba
  heads and channels, embedding channels) rank first, and a reorder moves them to the front;
  a layer with zero output ranks least important, a layer with huge output most;
* Mamba heads are ranked within their group: every prefix keeps the same count per group;
* bad calibration data and a never-reordered model give clear NestlmErrors.
"""

from __future__ import annotations

import pytest
import torch

import nestlm
from nestlm.cache import InferenceCache
from nestlm.elastic.importance import Importance, require_reordered
from nestlm.errors import NestlmError

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in tests/conftest.py


VOCAB = 64


def make_config(pattern: str = "M-M*-M*-", **kw) -> nestlm.ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        mamba_heads=8,
        mamba_head_dim=4,
        mamba_groups=2,
        d_state=8,
        attn_heads=8,
        kv_heads=4,
        attn_head_dim=8,
        ffn=48,
        mamba_chunk_size=8,
    )
    return nestlm.ModelConfig.from_pattern(pattern, **(base | kw))


@torch.no_grad()
def randomize(model: nestlm.HybridLM, seed: int = 0) -> nestlm.HybridLM:
    """Give every vector parameter (norm weights, biases, dt_bias, A_log, D) distinct values, so
    that a wrong permutation of any of them changes the function (the init makes many constant)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=g) * 2)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1 + 0.2 * r)
        elif name.endswith(".D"):
            p.copy_(r)
        elif name.endswith("dt_bias"):
            p.copy_(r - 2)
        elif p.dim() == 1:  # biases
            p.copy_(0.05 * r)
    return model


def build(cfg: nestlm.ModelConfig, seed: int = 0, random_vectors: bool = True) -> nestlm.HybridLM:
    torch.manual_seed(seed)
    model = nestlm.HybridLM(cfg).eval()
    return randomize(model, seed) if random_vectors else model


def calib(n: int = 3, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


IDS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(7))


def assert_reorder_keeps_function(model: nestlm.HybridLM, batches: list[torch.Tensor]) -> Importance:
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(IDS).logits
    imp = nestlm.estimate_importance(model, batches, progress=False)
    out = nestlm.reorder(model, imp)
    assert out is model
    # the weights really moved (else the check below proves nothing)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before_sd[k])]
    assert any("embeddings" in k for k in moved)
    assert any("in_proj" in k for k in moved) or not any(ls.kind == "mamba" for ls in model.config.layers)
    with torch.no_grad():
        after = model(IDS).logits
    assert (after - ref).abs().max().item() <= 1e-5
    # the stored importance is re-expressed in the new order: every ranking is now a prefix
    new = model.importance
    assert new.reordered and new is not imp
    assert torch.equal(new.hidden, new.hidden.sort(descending=True).values)
    for ls, sc in zip(model.config.layers, new.layers, strict=True):
        if ls.kind == "mlp":
            assert torch.equal(sc["neuron"], sc["neuron"].sort(descending=True).values)
        elif ls.kind == "attention":
            assert torch.equal(sc["kv"], sc["kv"].sort(descending=True).values)
            per = sc["head"].view(ls.heads // ls.kv_heads, ls.kv_heads)
            assert torch.equal(per, per.sort(dim=0, descending=True).values)
        else:
            per = sc["head"].view(ls.heads // ls.groups, ls.groups)
            assert torch.equal(per, per.sort(dim=0, descending=True).values)
            assert torch.equal(sc["channel"], sc["channel"].sort(dim=1, descending=True).values)
    # a second reorder by the stored (already descending) scores is the identity
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    nestlm.reorder(model, model.importance)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    return imp


# --------------------------------------------------------------------------- 1. function unchanged
@pytest.mark.parametrize(
    "name, pattern, kw",
    [
        ("groups4-gqa-untied", "M-M*-M*-", dict(mamba_heads=8, mamba_groups=4, attn_heads=8, kv_heads=2)),
        ("groups2-gqa-tied", "M*-M-*M-", dict(tie_embeddings=True)),
        ("mha-one-group", "*M-M-", dict(mamba_groups=1, attn_heads=4, kv_heads=4)),
        (
            "swiglu-biases",
            "M-M*-M*-",
            dict(mlp_act="swiglu", mlp_bias=True, mamba_proj_bias=True, attention_bias=True, mamba_conv_bias=True),
        ),
        (
            "rope-no-conv-bias-fp32-residual",
            "M*-M*-",
            dict(rope_theta=1e4, mamba_conv_bias=False, residual_in_fp32=True),
        ),
    ],
)
def test_reorder_keeps_logits(name, pattern, kw):
    model = build(make_config(pattern, **kw))
    assert_reorder_keeps_function(model, calib())


def test_reorder_keeps_cached_decode():
    """The decode path (conv state, SSM state, KV cache) sees the same model after a reorder."""
    model = build(make_config())
    prompt, nxt = IDS[:, :12], IDS[:, 12:15]

    @torch.no_grad()
    def run() -> torch.Tensor:
        cache = InferenceCache(model.config.n_layers, capacity=16)
        outs = [model(prompt, cache=cache).logits[:, -1]]
        for t in range(nxt.shape[1]):
            outs.append(model(nxt[:, t : t + 1], cache=cache).logits[:, -1])
        return torch.stack(outs, 1)

    ref = run()
    nestlm.reorder(model, nestlm.estimate_importance(model, calib(), progress=False))
    assert (run() - ref).abs().max().item() <= 1e-5


def _hf_model(tmp_path, tie: bool = False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        layers_block_type=["mamba", "mlp", "attention", "mlp", "mamba", "mlp"],
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=8,
        mamba_head_dim=4,
        n_groups=4,
        ssm_state_size=8,
        chunk_size=8,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(3)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make a wrong permutation visible
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape))
            elif name.endswith(".D") or name.endswith("dt_bias") or name.endswith("conv1d.bias"):
                p.copy_(torch.randn(p.shape) * 0.5)
    hf.save_pretrained(tmp_path / "hf")
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_reorder_hf_checkpoint_and_export_back(tmp_path, tie):
    """A transformers NemotronH checkpoint, loaded by nestlm, reordered, exported back to HF
    format: plain transformers computes the same function as the original."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_model(tmp_path, tie)
    model = nestlm.load(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_ref = hf(IDS).logits
        assert (model(IDS).logits - hf_ref).abs().max().item() <= 1e-4
    assert_reorder_keeps_function(model, calib())
    nestlm.export_hf(model, tmp_path / "hf_reordered")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_reordered").eval()
    with torch.no_grad():
        assert (back(IDS).logits - hf_ref).abs().max().item() <= 1e-4


def test_reorder_survives_save_and_load(tmp_path):
    model = build(make_config())
    nestlm.reorder(model, nestlm.estimate_importance(model, calib(), progress=False))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = nestlm.load(tmp_path / "m")
    imp = require_reordered(loaded, "slicing")
    assert imp.reordered and torch.equal(imp.hidden, model.importance.hidden)
    assert imp.layer_order == model.importance.layer_order
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# --------------------------------------------------------------------------- 3. the ranking is right
def _estimate(model: nestlm.HybridLM, depth: bool = False) -> Importance:
    return nestlm.estimate_importance(model, calib(n=2, batch=4), depth=depth, progress=False)


def _hidden_perm(imp: Importance) -> torch.Tensor:
    return torch.sort(imp.hidden, descending=True, stable=True).indices


def test_hidden_channels_scaled_in_the_embedding_rank_first():
    model = build(make_config(), random_vectors=False)
    chosen = [3, 11, 20, 29]
    with torch.no_grad():
        model.embeddings.weight[:, chosen] *= 10
    orig = model.embeddings.weight.detach().clone()
    imp = _estimate(model)
    assert set(imp.hidden.topk(len(chosen)).indices.tolist()) == set(chosen)
    nestlm.reorder(model, imp)
    # the chosen channels are now the first hidden channels: a hidden=4 sub-network keeps them
    front = model.embeddings.weight[:, : len(chosen)]
    for c in chosen:
        assert any(torch.equal(front[:, k], orig[:, c]) for k in range(len(chosen)))


def test_hidden_importance_is_magnitude_not_signed_mean():
    """A channel that is +1 / -1 on alternate tokens (signed mean 0) outranks a constant 0.3."""
    model = build(make_config(), random_vectors=False)
    loud, steady = 7, 19
    with torch.no_grad():
        sign = torch.where(torch.arange(VOCAB) % 2 == 0, 1.0, -1.0)
        model.embeddings.weight[:, loud] = sign
        model.embeddings.weight[:, steady] = 0.3
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(2):
        even = torch.randint(0, VOCAB // 2, (4, 8), generator=g) * 2
        batches.append(torch.stack([even, even + 1], dim=-1).reshape(4, 16))  # even, odd, even, odd, ...
    imp = nestlm.estimate_importance(model, batches, depth=False, progress=False)
    top = torch.sort(imp.hidden, descending=True).indices.tolist()
    assert top[:2] == [loud, steady]


def test_mlp_neurons_with_scaled_up_rows_rank_first():
    model = build(make_config(), random_vectors=False)
    layer, chosen = 1, [5, 17, 30, 41]
    mlp = model.layers[layer].mixer
    with torch.no_grad():
        mlp.up_proj.weight[chosen] *= 10
    orig = mlp.up_proj.weight.detach().clone()
    imp = _estimate(model)
    scores = imp.layers[layer]["neuron"]
    assert set(scores.topk(len(chosen)).indices.tolist()) == set(chosen)
    assert scores[chosen].min() > 10 * scores[[i for i in range(48) if i not in chosen]].max()
    ph = _hidden_perm(imp)
    nestlm.reorder(model, imp)
    kept = mlp.up_proj.weight[: len(chosen)]  # what an ffn=4 sub-network keeps
    want = orig[chosen][:, ph]
    assert all(any(torch.equal(kept[k], want[c]) for k in range(len(chosen))) for c in range(len(chosen)))


def test_attention_kv_group_and_query_head_ranking():
    """Scaling the values of one KV group makes that group rank first; within another group, a
    query head with sharp attention (large q, large k) outranks one that averages (q = 0)."""
    cfg = make_config("*-M-", attn_heads=8, kv_heads=4)  # 2 query heads per KV group
    model = build(cfg, random_vectors=False)
    att, hd, nkv = model.layers[0].mixer, 8, 4
    big_group, sharp_group = 2, 1
    sharp, flat = 1 * nkv + sharp_group, 0 * nkv + sharp_group  # rank-major: head r*nkv + g
    with torch.no_grad():
        att.v_proj.weight[big_group * hd : (big_group + 1) * hd] *= 10
        att.k_proj.weight[sharp_group * hd : (sharp_group + 1) * hd] *= 10
        att.q_proj.weight[sharp * hd : (sharp + 1) * hd] *= 100
        att.q_proj.weight[flat * hd : (flat + 1) * hd] = 0
    q_orig = att.q_proj.weight.detach().clone()
    v_orig = att.v_proj.weight.detach().clone()
    imp = _estimate(model)
    kv, head = imp.layers[0]["kv"], imp.layers[0]["head"]
    assert int(kv.argmax()) == big_group
    assert head[sharp] > 1.5 * head[flat]
    ph = _hidden_perm(imp)
    nestlm.reorder(model, imp)
    # new KV head 0 is the scaled group; the sharp head leads its (moved) group
    assert torch.equal(att.v_proj.weight[:hd], v_orig[big_group * hd : (big_group + 1) * hd][:, ph])
    new_g = int((torch.sort(kv, descending=True, stable=True).indices == sharp_group).nonzero())
    assert torch.equal(att.q_proj.weight[new_g * hd : (new_g + 1) * hd], q_orig[sharp * hd : (sharp + 1) * hd][:, ph])


def test_mamba_heads_rank_within_groups_and_every_prefix_keeps_all_groups():
    """Group 0's heads are all scaled x200 (a global ranking would keep only group 0); the chosen
    head of each group is scaled further. Ranking is per group: head k*G..(k+1)*G-1 of the
    reordered model is each group's k-th best, so any kept count keeps k heads in every group."""
    cfg = make_config("M-*-", mamba_heads=12, mamba_groups=3, mamba_head_dim=4)  # 4 heads per group
    model = build(cfg, random_vectors=False)
    mx = model.layers[0].mixer
    H, P, G = 12, 4, 3
    x0 = H * P  # x rows of in_proj start after z
    chosen = {0: 2 * G + 0, 1: 3 * G + 1, 2: 1 * G + 2}  # group -> head (rank-major: r*G + g)
    hot_channel = (chosen[1], 2)  # one channel of a chosen head, made the top channel of that head
    with torch.no_grad():
        for h in range(H):
            if h % G == 0:
                mx.in_proj.weight[x0 + h * P : x0 + (h + 1) * P] *= 200
        for h in chosen.values():
            mx.in_proj.weight[x0 + h * P : x0 + (h + 1) * P] *= 10
        h, c = hot_channel
        mx.in_proj.weight[x0 + h * P + c] *= 10
    orig_x = mx.in_proj.weight[x0 : x0 + H * P].detach().clone()
    imp = _estimate(model)
    heads = imp.layers[0]["head"].view(H // G, G)  # [rank, group]
    for g, h in chosen.items():
        assert int(heads[:, g].argmax()) * G + g == h
    assert int(imp.layers[0]["channel"][hot_channel[0]].argmax()) == hot_channel[1]
    # a global top-4 would take group 0 only: the per-group ranking must not
    assert set(imp.layers[0]["head"].topk(H // G).indices.remainder(G).tolist()) == {0}

    # trace heads through the reorder: A_log is log(1..H) at init, unique per head
    a_before = mx.A_log.detach().clone()
    ph = _hidden_perm(imp)
    nestlm.reorder(model, imp)
    origin = [int((a_before == a).nonzero()) for a in mx.A_log.detach()]  # new head -> old head
    assert sorted(origin) == list(range(H))
    for k in range(1, H // G + 1):  # every budget of k heads per group
        kept = origin[: k * G]
        assert [sum(1 for h in kept if h % G == g) for g in range(G)] == [k] * G
        assert all(origin[j] % G == j % G for j in range(k * G))  # head j still reads group j % G
    assert {origin[g] for g in range(G)} == set(chosen.values())
    # the hot channel is channel 0 of its head now (a head_dim=1 sub-network keeps it)
    new_h = origin.index(hot_channel[0])
    new_row = mx.in_proj.weight[x0 + new_h * P]
    assert torch.equal(new_row, orig_x[hot_channel[0] * P + hot_channel[1]][ph])


def test_depth_zero_output_layer_is_least_important_and_huge_output_most():
    cfg = make_config("M-M*-M-")  # M - M * - M -
    model = build(cfg, random_vectors=False)
    dead, huge = 2, 3  # a Mamba layer with zero output, an attention layer with huge output
    with torch.no_grad():
        model.layers[dead].mixer.out_proj.weight.zero_()
        model.layers[huge].mixer.o_proj.weight *= 100
    imp = _estimate(model, depth=True)
    assert sorted(imp.layer_order) == list(range(cfg.n_layers))
    assert imp.layer_order[0] == dead and imp.depth_scores[0] == 0.0
    assert imp.layer_order[-1] == huge
    assert all(s > 0 for s in imp.depth_scores[1:])  # every other layer changes the logits
    assert imp.depth_scores[-1] == float("inf")  # the last layer is never removed


# --------------------------------------------------------------------------- 5. bad input
def test_empty_calibration_data_is_a_clear_error():
    model = build(make_config("M-*"))
    with pytest.raises(NestlmError, match="calibration data is empty"):
        nestlm.estimate_importance(model, [], progress=False)
    with pytest.raises(NestlmError, match="calibration data is empty"):
        nestlm.estimate_importance(model, iter(()), progress=False)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randint(0, VOCAB, (2, 1)), r"batch 1 has shape \(2, 1\).*>= 2 tokens"),
        (torch.randint(0, VOCAB, (0, 8)), r"batch 1 has shape \(0, 8\)"),
        (torch.randint(0, VOCAB, (8,)), r"batch 1 must be a LongTensor \(B, T\)"),
        (torch.rand(2, 8), r"batch 1 must be a LongTensor \(B, T\)"),
    ],
)
def test_bad_calibration_batches_are_clear_errors(bad, match):
    model = build(make_config("M-*"))
    with pytest.raises(NestlmError, match=match):
        nestlm.estimate_importance(model, [calib(1)[0], bad], progress=False)


def test_require_reordered_raises_on_a_model_never_reordered(tmp_path):
    model = build(make_config("M-*"))
    with pytest.raises(NestlmError, match="reordered by importance.*nestlm importance"):
        require_reordered(model, "one-shot pruning")
    # scores alone (estimated, not applied) are not enough either
    model.importance = nestlm.estimate_importance(model, calib(1), depth=False, progress=False)
    with pytest.raises(NestlmError, match="reordered by importance"):
        require_reordered(model, "one-shot pruning")
    # nor is a checkpoint saved without reordering
    model.importance = None
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(NestlmError, match=str(tmp_path / "plain")):
        require_reordered(nestlm.load(tmp_path / "plain"), "slicing")
    nestlm.reorder(model, nestlm.estimate_importance(model, calib(1), depth=False, progress=False))
    assert require_reordered(model, "slicing").reordered


def test_reorder_rejects_scores_of_another_model():
    small = build(make_config("M-*"))
    other = build(make_config("M-*", hidden_size=16))
    imp = nestlm.estimate_importance(other, calib(1), depth=False, progress=False)
    with pytest.raises(NestlmError, match="do not match this model"):
        nestlm.reorder(small, imp)
