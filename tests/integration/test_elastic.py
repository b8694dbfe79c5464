"""Nested forward == standalone slice, exact counts, memory, and the slice's file formats.

For random valid ArchSpecs (hypothesis; heterogeneous widths, dropped layers, Mamba head_dim
below full, fewer KV heads) on three parents (relu2 untied; SwiGLU + every bias + tied + RoPE;
a heterogeneous parent):
  * model.slice(spec) gives the logits of model(ids, arch=spec) within 1e-5 (fp32), in a full
    forward and through a prefill + decode step with the cache;
  * the slice's parameter count equals spec.num_parameters(config), exactly;
  * the inference cache after a prefill of T tokens holds exactly the bytes that
    memory_bytes adds on top of the weights (KV, conv and SSM state).
Then: save_pretrained + load of a slice is bit-identical; a homogeneous slice exported with
export_hf loads in plain transformers with the same logits (1e-4); a heterogeneous slice asked
for in HF format is a clear error naming the nestlm format; forward rejects an invalid spec.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nestlm
from nestlm.cache import AttentionState, InferenceCache, MambaState
from nestlm.config import LayerSpec, ModelConfig
from nestlm.elastic.arch import ArchError, ArchSpec, count_parameters
from nestlm.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in tests/conftest.py


VOCAB = 61
T = 13  # odd, and not a multiple of the SSD chunk (8)
IDS = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(5))
NEXT = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(6))

HOMOGENEOUS = dict(
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


def parent_config(name: str) -> ModelConfig:
    if name == "relu2-untied":
        return ModelConfig.from_pattern("M*-M-*M-", **HOMOGENEOUS)
    if name == "swiglu-bias-tied-rope":
        return ModelConfig.from_pattern(
            "M*-M-*M-",
            **HOMOGENEOUS,
            mlp_act="swiglu",
            mlp_bias=True,
            attention_bias=True,
            mamba_proj_bias=True,
            tie_embeddings=True,
            rope_theta=1e4,
        )
    if name == "heterogeneous-parent":
        return ModelConfig(
            vocab_size=VOCAB,
            hidden_size=24,
            mamba_chunk_size=8,
            layers=[
                LayerSpec("mamba", heads=6, head_dim=4, groups=3, d_state=8),
                LayerSpec("attention", heads=6, kv_heads=2, head_dim=8),
                LayerSpec("mlp", ffn=40),
                LayerSpec("mamba", heads=8, head_dim=6, groups=2, d_state=4),
                LayerSpec("mlp", ffn=24),
                LayerSpec("attention", heads=4, kv_heads=4, head_dim=4),
                LayerSpec("mamba", heads=4, head_dim=2, groups=1, d_state=8),
            ],
        )
    raise KeyError(name)


PARENTS = ["relu2-untied", "swiglu-bias-tied-rope", "heterogeneous-parent"]


@torch.no_grad()
def randomize(model: nestlm.HybridLM, seed: int) -> nestlm.HybridLM:
    """Distinct values in every vector parameter (the init makes norms 1 and biases 0, which would
    hide a wrong index in a slicing rule)."""
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
        elif p.dim() == 1:
            p.copy_(0.05 * r)
    return model


@functools.cache
def parent(name: str) -> nestlm.HybridLM:
    """A random parent, reordered by importance (as every elastic parent is)."""
    torch.manual_seed(0)
    model = randomize(nestlm.HybridLM(parent_config(name)).eval(), seed=1)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    return nestlm.reorder(model, nestlm.estimate_importance(model, batches, depth=False, progress=False))


def cache_bytes(cache: InferenceCache) -> int:
    total = 0
    for st_ in cache.layers:
        if isinstance(st_, AttentionState):
            total += sum(t.numel() * t.element_size() for t in (st_.k, st_.v))
        elif isinstance(st_, MambaState):
            total += sum(t.numel() * t.element_size() for t in (st_.conv, st_.ssm))
    return total


def check_spec(model: nestlm.HybridLM, spec: ArchSpec) -> nestlm.HybridLM:
    """Every property of item 2 for one spec; returns the slice."""
    cfg = model.config
    spec.validate(cfg)
    small = model.slice(spec)
    assert small.config.layers == [ls for ls in spec.layers if ls is not None]
    assert small.config.hidden_size == spec.hidden
    # exact counts
    n = sum(p.numel() for p in small.parameters())
    assert n == spec.num_parameters(cfg) == model.num_parameters(arch=spec) == count_parameters(small.config)
    # standalone: no storage shared with the parent
    parent_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not parent_ptrs & {p.untyped_storage().data_ptr() for p in small.parameters()}
    tol = 1e-5  # fp32
    with torch.no_grad():
        nested = model(IDS, arch=spec).logits
        sliced = small(IDS).logits
        assert (nested - sliced).abs().max().item() <= tol
        # cached prefill + one decode step, and the cache's bytes against memory_bytes
        c_nested, c_small = InferenceCache(cfg.n_layers, capacity=T), InferenceCache(small.config.n_layers, capacity=T)
        assert (model(IDS, arch=spec, cache=c_nested).logits - small(IDS, cache=c_small).logits).abs().max() <= tol
        want = spec.memory_bytes(cfg, torch.float32, batch=IDS.shape[0], context=T) - 4 * n
        assert cache_bytes(c_nested) == cache_bytes(c_small) == want
        step_nested = model(NEXT, arch=spec, cache=c_nested).logits
        step_small = small(NEXT, cache=c_small).logits
        assert (step_nested - step_small).abs().max().item() <= tol
    return small


@st.composite
def arch_specs(draw: st.DrawFn, cfg: ModelConfig) -> ArchSpec:
    """A random valid ArchSpec of ``cfg``: per-layer widths, some layers dropped."""
    layers: list[LayerSpec | None] = []
    for p in cfg.layers:
        if draw(st.integers(0, 4)) == 0:
            layers.append(None)
        elif p.kind == "mamba":
            k = draw(st.integers(1, p.heads // p.groups))
            layers.append(
                LayerSpec(
                    "mamba",
                    heads=k * p.groups,
                    head_dim=draw(st.integers(1, p.head_dim)),
                    groups=p.groups,
                    d_state=p.d_state,
                )
            )
        elif p.kind == "attention":
            kv = draw(st.integers(1, p.kv_heads))
            r = draw(st.integers(1, p.heads // p.kv_heads))
            layers.append(LayerSpec("attention", heads=r * kv, kv_heads=kv, head_dim=p.head_dim))
        else:
            layers.append(LayerSpec("mlp", ffn=draw(st.integers(1, p.ffn))))
    if all(ls is None for ls in layers):
        i = draw(st.integers(0, cfg.n_layers - 1))
        layers[i] = cfg.layers[i]
    return ArchSpec(draw(st.integers(1, cfg.hidden_size)), layers)


@pytest.mark.parametrize("name", PARENTS)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_specs_slice_equals_nested(name, data):
    model = parent(name)
    check_spec(model, data.draw(arch_specs(model.config)))


# --------------------------------------------------------------------------- named cases
def _named(cfg: ModelConfig, case: str) -> ArchSpec:
    full = ArchSpec.full(cfg)
    if case == "full":
        return full
    if case == "heterogeneous":
        return ArchSpec.per_layer(
            cfg,
            24,
            [
                {"heads": 2},
                {"heads": 4, "kv_heads": 4},
                {"ffn": 40},
                {"heads": 6},
                {"ffn": 7},
                {"heads": 2, "kv_heads": 2},
                {"heads": 8},
                {"ffn": 48},
            ],
        )
    if case == "dropped":
        return full.replace(cfg, drop_layers=[0, 4, 7])
    if case == "mamba-head-dim":
        return full.replace(cfg, mamba_head_dim=3)
    if case == "fewer-kv":
        return full.replace(cfg, attn_heads=6, kv_heads=3)  # 2 per group, 3 of 4 groups
    if case == "everything":
        return full.replace(
            cfg, hidden=20, mamba_heads=4, mamba_head_dim=2, attn_heads=2, kv_heads=1, mlp=9, drop_layers=[2]
        )
    raise KeyError(case)


@pytest.mark.parametrize("name", ["relu2-untied", "swiglu-bias-tied-rope"])
@pytest.mark.parametrize("case", ["full", "heterogeneous", "dropped", "mamba-head-dim", "fewer-kv", "everything"])
def test_named_specs(name, case):
    model = parent(name)
    spec = _named(model.config, case)
    small = check_spec(model, spec)
    if case == "full":
        assert spec.is_full(model.config)
        assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():  # the full "slice" is the parent itself, bit for bit
            assert torch.equal(small(IDS).logits, model(IDS).logits)
    else:
        assert spec.num_parameters(model.config) < model.num_parameters()
    assert spec.is_homogeneous() == (case != "heterogeneous")


def test_bf16_cache_bytes_match_memory_bytes():
    """In bf16 the KV and conv state take 2 bytes, the SSM state stays fp32: memory_bytes agrees."""
    model = nestlm.HybridLM(parent_config("relu2-untied")).eval().to(torch.bfloat16)
    spec = _named(model.config, "everything")
    small = model.slice(spec)
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())
    for m, s in ((model, spec), (small, None)):
        cache = InferenceCache(m.config.n_layers, capacity=T)
        with torch.no_grad():
            m(IDS, arch=s, cache=cache)
        assert any(isinstance(x, MambaState) and x.ssm.dtype == torch.float32 for x in cache.layers)
        n = spec.num_parameters(model.config)
        assert cache_bytes(cache) == spec.memory_bytes(model.config, torch.bfloat16, IDS.shape[0], T) - 2 * n


# --------------------------------------------------------------------------- files
def test_slice_save_and_load_is_bit_identical(tmp_path):
    for name in ("swiglu-bias-tied-rope", "heterogeneous-parent"):
        model = parent(name)
        spec = _named(model.config, "heterogeneous") if name != "heterogeneous-parent" else None
        if spec is None:
            spec = ArchSpec.per_layer(
                model.config, 16, [{"heads": 3}, {"heads": 2, "kv_heads": 1}, None, {"head_dim": 5}, {"ffn": 3}, {}, {}]
            )
        small = model.slice(spec)
        small.save_pretrained(str(tmp_path / name))
        loaded = nestlm.load(tmp_path / name)
        assert loaded.config.to_dict() == small.config.to_dict()
        assert sum(p.numel() for p in loaded.parameters()) == spec.num_parameters(model.config)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, small(IDS).logits)
            assert (loaded(IDS).logits - model(IDS, arch=spec).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["everything", "fewer-kv"])
def test_homogeneous_slice_exports_to_plain_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    model = parent("relu2-untied")
    spec = _named(model.config, case)
    assert spec.is_homogeneous()
    small = model.slice(spec)
    nestlm.export_hf(small, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert hf.config.hidden_size == spec.hidden
    with torch.no_grad():
        want = model(IDS, arch=spec).logits
        assert (hf(IDS).logits.float() - want).abs().max().item() <= 1e-4
    # and back: nestlm reads the exported directory as the same slice
    again = nestlm.load(tmp_path / "hf")
    assert sum(p.numel() for p in again.parameters()) == spec.num_parameters(model.config)
    with torch.no_grad():
        assert (again(IDS).logits - want).abs().max().item() <= 1e-5


def test_heterogeneous_slice_in_hf_format_is_a_clear_error(tmp_path):
    model = parent("relu2-untied")
    small = model.slice(_named(model.config, "heterogeneous"))
    with pytest.raises(CheckpointError, match=r"same widths in every \w+ layer.*nestlm format"):
        nestlm.export_hf(small, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


# --------------------------------------------------------------------------- forward guards
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda full: full.replace(mlp=64), r"layer 2 \(mlp\): MLP width 64 exceeds the parent's 48"),
        (lambda full: full.replace(hidden=40), r"hidden 40 must be within 1\.\.32"),
        (lambda full: ArchSpec(32, full.layers[:-1]), r"ArchSpec has 7 layers; the parent has 8"),
        (lambda full: full.replace(kv_heads=2), r"layer 1 \(attention\): 4 query heads per KV group exceed"),
    ],
)
def test_forward_and_slice_reject_invalid_specs(make, match):
    """A spec the parent cannot nest is an error, never a silent truncation of the weights."""
    model = parent("relu2-untied")
    bad = make(ArchSpec.full(model.config))
    with pytest.raises(ArchError, match=match):
        model(IDS, arch=bad)
    with pytest.raises(ArchError, match=match):
        model.slice(bad)
