"""Every elastic step on Transformer parents: importance + reorder, nested forward = slice, export_hf.

For each family: reorder keeps the logits (1e-5); a random homogeneous ArchSpec over hidden,
MLP, attention heads, KV heads and depth (whole Transformer layers) sliced equals the nested
forward (1e-5) with exactly ArchSpec's parameter count; its export_hf directory is the same
architecture (config model_type and class) and loads in plain transformers with the same
logits (1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import nestlm
from tests.transformer_models import SHAPES, hf_classes, make_shape

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(SHAPES))
def ranked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(name, the parent as loaded, the parent reordered by importance, calibration ids)."""
    path = make_shape(tmp_path_factory.mktemp("e") / request.param, request.param, seed=3)
    parent = nestlm.load(path).eval()
    model = nestlm.load(path).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 97, (2, 24), generator=g) for _ in range(3)]
    imp = nestlm.estimate_importance(model, batches, depth=True, depth_batches=1, progress=False)
    nestlm.reorder(model, imp)
    return request.param, parent, model, batches


def _random_spec(cfg: nestlm.ModelConfig, seed: int) -> nestlm.ArchSpec:
    g = torch.Generator().manual_seed(seed)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    a, m = cfg.layers[0], cfg.layers[1]
    kv = pick(1, a.kv_heads)
    per = pick(1, a.heads // a.kv_heads)
    drop = pick(0, cfg.n_layers // 2 - 1)  # one whole Transformer layer: its attention and MLP blocks
    hidden = pick(cfg.hidden_size // 2, cfg.hidden_size - 1)
    if cfg.hf_config["model_type"] == "llama":  # transformers' LlamaConfig wants hidden % heads == 0
        hidden -= hidden % (kv * per)
    return nestlm.ArchSpec.full(cfg).replace(
        cfg,
        hidden=hidden,
        attn_heads=kv * per,
        kv_heads=kv,
        mlp=pick(4, m.ffn - 1),
        drop_layers=[2 * drop, 2 * drop + 1],
    )


def test_reorder_keeps_the_logits_and_ranks_heads_within_kv_groups(ranked) -> None:
    name, parent, model, batches = ranked
    ids = torch.cat(batches)
    with torch.no_grad():
        diff = (parent(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    imp = model.importance
    assert imp.reordered and len(imp.layer_order) == model.config.n_layers
    for ls, sc in zip(model.config.layers, imp.layers, strict=True):
        if ls.kind == "attention":  # rank-major: head r*kv + g is rank r of KV group g
            heads = sc["head"].view(ls.heads // ls.kv_heads, ls.kv_heads)
            assert (heads[:-1] >= heads[1:]).all() and (sc["kv"][:-1] >= sc["kv"][1:]).all()
        else:
            assert (sc["neuron"][:-1] >= sc["neuron"][1:]).all()
    assert (imp.hidden[:-1] >= imp.hidden[1:]).all()
    # the weights really moved (a no-op reorder would pass the logits check too)
    assert not torch.equal(parent.layers[1].mixer.up_proj.weight, model.layers[1].mixer.up_proj.weight)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_spec_slice_equals_nested_forward_and_exports_to_the_same_family(ranked, seed, tmp_path) -> None:
    name, _, model, batches = ranked
    cfg = model.config
    spec = _random_spec(cfg, seed + len(name))
    assert spec.is_homogeneous() and not spec.is_full(cfg)
    small = model.slice(spec).eval()
    ids = torch.cat(batches)
    with torch.no_grad():
        nested = model(ids, arch=spec).logits
        sliced = small(ids).logits
    assert (nested - sliced).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in small.parameters()) == spec.num_parameters(cfg) == model.num_parameters(arch=spec)

    nestlm.export_hf(small, tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    family = SHAPES[name]["family"]
    assert raw["model_type"] == family and raw["head_dim"] == cfg.layers[0].head_dim
    assert raw["hidden_size"] == spec.hidden and raw["num_hidden_layers"] == cfg.n_layers // 2 - 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is hf_classes(family)[1]
    assert sum(p.numel() for p in hf.parameters()) == spec.num_parameters(cfg)
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - nested).abs().max().item()
    assert diff <= 1e-4, diff
    # and back: nestlm reads the exported directory as the same slice
    again = nestlm.load(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (again(ids).logits - sliced).abs().max().item() <= 1e-5


def test_export_refuses_a_slice_that_splits_a_transformer_layer(ranked, tmp_path) -> None:
    _, _, model, _ = ranked
    spec = nestlm.ArchSpec.full(model.config).replace(model.config, drop_layers=[1])  # an MLP block alone
    with pytest.raises(nestlm.CheckpointError, match="whole Transformer layers"):
        nestlm.export_hf(model.slice(spec), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_heterogeneous_widths(ranked, tmp_path) -> None:
    _, _, model, _ = ranked
    cfg = model.config
    layers = [None if i > 3 else {"ffn": 8 + 4 * i} if ls.kind == "mlp" else {} for i, ls in enumerate(cfg.layers)]
    spec = nestlm.ArchSpec.per_layer(cfg, cfg.hidden_size, layers)
    with pytest.raises(nestlm.CheckpointError, match="same widths in every mlp layer"):
        nestlm.export_hf(model.slice(spec), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_llama_export_refuses_what_transformers_llama_config_rejects(ranked, tmp_path) -> None:
    name, _, model, _ = ranked
    cfg = model.config
    spec = nestlm.ArchSpec.full(cfg).replace(cfg, hidden=cfg.hidden_size - 1)
    if SHAPES[name]["family"] != "llama":  # the others take any hidden size
        nestlm.export_hf(model.slice(spec), tmp_path / "hf")
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.hidden_size == cfg.hidden_size - 1
        return
    with pytest.raises(nestlm.CheckpointError, match="hidden_size divisible by num_attention_heads"):
        nestlm.export_hf(model.slice(spec), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
