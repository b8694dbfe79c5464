"""ArchSpec: exact counts, budget targets, one-shot search, and clear errors for invalid specs.

* count_parameters / num_parameters equal the parameter count of a built model, for every
  option that adds weights (biases, SwiGLU, tied embeddings) and heterogeneous parents;
* parse_target reads fractions, parameter counts and memory sizes (GB and GiB);
* closest_homogeneous lands within 2% of a fraction or a memory target and validates;
  an unreachable target is an ArchError saying what range is reachable;
* invalid specs (Mamba heads vs groups, query vs KV heads, sizes above the parent's, zero
  layers, wrong layer count, a changed kind, bad hidden) are ArchErrors naming layer and field.
"""

from __future__ import annotations

import pytest
import torch

import nestlm
from nestlm.config import LayerSpec, ModelConfig
from nestlm.elastic.arch import (
    ArchError,
    ArchSpec,
    Target,
    closest_homogeneous,
    count_parameters,
    memory_bytes,
    parse_target,
)
from nestlm.errors import NestlmError

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in tests/conftest.py


BASE = dict(
    vocab_size=97,
    hidden_size=64,
    mamba_heads=8,
    mamba_head_dim=8,
    mamba_groups=2,
    d_state=16,
    attn_heads=8,
    kv_heads=4,
    attn_head_dim=8,
    ffn=128,
    mamba_chunk_size=8,
)


def cfg(pattern: str = "M*-M-*M-", **kw) -> ModelConfig:
    return ModelConfig.from_pattern(pattern, **(BASE | kw))


def built_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in nestlm.HybridLM(config).parameters())


HETERO = ModelConfig(
    vocab_size=50,
    hidden_size=24,
    layers=[
        LayerSpec("mamba", heads=6, head_dim=4, groups=3, d_state=8),
        LayerSpec("attention", heads=6, kv_heads=2, head_dim=8),
        LayerSpec("mlp", ffn=40),
        LayerSpec("mamba", heads=8, head_dim=6, groups=2, d_state=4),
    ],
)


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    "config",
    [
        cfg(),
        cfg(tie_embeddings=True),
        cfg(mlp_act="swiglu", mlp_bias=True),
        cfg(mamba_proj_bias=True, mamba_conv_bias=False, attention_bias=True),
        cfg("M", mamba_conv_kernel=3),
        HETERO,
    ],
    ids=["plain", "tied", "swiglu-bias", "proj-bias-no-conv-bias", "single-mamba", "heterogeneous"],
)
def test_counts_equal_the_built_model(config):
    n = built_count(config)
    assert count_parameters(config) == n
    assert ArchSpec.full(config).num_parameters(config) == n
    # every sub-network's count equals the model built from its own config
    drop = [0] if config.n_layers > 1 else []
    spec = ArchSpec.full(config).replace(config, hidden=config.hidden_size // 2, drop_layers=drop)
    assert spec.num_parameters(config) == built_count(spec.to_config(config))


def test_memory_bytes_is_weights_plus_state():
    config = cfg()
    b, T = 3, 100
    kv = 2 * b * T * 4 * 8 * 2  # 2 attention layers x (k + v) x kv_heads x head_dim, bf16
    conv = b * (8 * 8 + 2 * 2 * 16) * 3 * 2  # per Mamba layer, bf16, K-1 = 3 positions
    ssm = b * 8 * 8 * 16 * 4  # per Mamba layer, fp32
    want = count_parameters(config) * 2 + 2 * kv + 3 * (conv + ssm)
    assert memory_bytes(config, torch.bfloat16, b, T) == want
    assert ArchSpec.full(config).memory_bytes(config, torch.bfloat16, b, T) == want
    # fp32: weights, KV and conv state double, the SSM state does not change
    assert memory_bytes(config, torch.float32, b, T) == 2 * count_parameters(config) * 2 + 4 * kv + 6 * conv + 3 * ssm


# --------------------------------------------------------------------------- builders
def test_replace_is_homogeneous_and_accumulates_drops():
    config = cfg()
    full = ArchSpec.full(config)
    assert full.is_full(config) and full.is_homogeneous()
    s = full.replace(config, mlp=64, drop_layers=[1])
    s2 = s.replace(config, mamba_heads=4, drop_layers=[2])
    assert [i for i, ls in enumerate(s2.layers) if ls is None] == [1, 2]
    assert all(ls.heads == 4 for ls in s2.layers if ls is not None and ls.kind == "mamba")
    assert all(ls.ffn == 64 for ls in s2.layers if ls is not None and ls.kind == "mlp")
    assert s2.is_homogeneous() and not s2.is_full(config)
    assert full.layers == config.layers  # replace never mutates the spec it starts from
    het = ArchSpec.per_layer(config, 64, [{"heads": 2}] + [{}] * 7)
    assert not het.is_homogeneous()
    assert ArchSpec.from_dict(het.to_dict(), config) == het
    assert "dropped=[1, 2]" in s2.describe()


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("0.5", "fraction", 0.5),
        (".75", "fraction", 0.75),
        ("1", "fraction", 1.0),
        (0.25, "fraction", 0.25),
        ("6e9", "params", 6e9),
        ("6E9", "params", 6e9),
        (6_000_000_000, "params", 6e9),
        ("12GB", "memory", 12e9),
        ("12 gb", "memory", 12e9),
        ("12GiB", "memory", 12 * 2**30),
        ("1.5TB", "memory", 1.5e12),
        ("512MiB", "memory", 512 * 2**20),
        ("800kb", "memory", 800e3),
    ],
)
def test_parse_target(text, kind, value):
    t = parse_target(text)
    assert (t.kind, t.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize(
    "text, match",
    [
        ("abc", "not a fraction .* a parameter count .* or a memory size"),
        ("12 apples", "not a fraction"),
        ("0", "positive"),
        ("-0.5", "positive"),
        ("0GB", "memory size must be positive"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("1.5", "neither a fraction of the parent .* nor a whole parameter count"),
    ],
)
def test_parse_target_rejects(text, match):
    with pytest.raises(ArchError, match=match):
        parse_target(text)


def test_target_params_of_a_fraction():
    config = cfg()
    assert parse_target("0.5").params(config) == 0.5 * count_parameters(config)
    assert parse_target("6e9").params(config) == 6e9
    with pytest.raises(ValueError, match="memory"):
        parse_target("1GB").params(config)
    assert str(parse_target("12GiB")) == "12 GiB"


# --------------------------------------------------------------------------- one-shot search
@pytest.mark.parametrize("frac", ["0.5", "0.75", "0.3"])
def test_closest_homogeneous_fraction_within_two_percent(frac):
    config = cfg(vocab_size=64)
    spec = closest_homogeneous(config, parse_target(frac))
    spec.validate(config)
    assert spec.is_homogeneous() and all(ls is not None for ls in spec.layers)
    n, full = spec.num_parameters(config), count_parameters(config)
    assert abs(n / full - float(frac)) <= 0.02 * float(frac)
    # built, it has exactly that many parameters
    assert built_count(spec.to_config(config)) == n
    # widths really shrink on every axis (not only the MLP)
    assert spec.hidden < config.hidden_size
    assert all(ls.ffn < 128 for ls in spec.layers if ls.kind == "mlp")


def test_closest_homogeneous_memory_target():
    config = cfg(vocab_size=64)
    # short context: at 4096 tokens the KV cache (KV heads are not shrunk) would dominate
    full = memory_bytes(config, torch.bfloat16, 2, 64)
    goal = 0.6 * full
    spec = closest_homogeneous(config, parse_target(f"{goal / 1e6:.6f}MB"), batch=2, context=64)
    got = spec.memory_bytes(config, torch.bfloat16, 2, 64)
    assert abs(got - goal) / goal <= 0.02
    assert spec.num_parameters(config) < count_parameters(config)


def test_unreachable_targets_are_clear_errors():
    emb_heavy = cfg("M*-", vocab_size=8192, hidden_size=64)  # embeddings are ~95% of the model
    assert 2 * 8192 * 64 > 0.9 * count_parameters(emb_heavy)
    with pytest.raises(ArchError, match=r"budget 0\.01 of the parent's parameters .* cannot be reached within 2%") as e:
        closest_homogeneous(emb_heavy, parse_target("0.01"))
    assert "smallest nests" in str(e.value) and "give a budget in that range" in str(e.value)
    with pytest.raises(ArchError, match="cannot be reached"):
        closest_homogeneous(emb_heavy, parse_target("6e9"))  # above the parent
    with pytest.raises(ArchError, match="same widths in every layer"):
        closest_homogeneous(HETERO, Target("fraction", 0.5))


def test_widths_come_in_the_width_multiple_and_a_coarse_grid_says_why():
    from nestlm.elastic.axes import resolve_choices

    config = cfg("M*-M*-", hidden_size=96, ffn=200)
    for m in (8, 16):
        spec = closest_homogeneous(config, parse_target("0.6"), width_multiple=m)
        assert spec.hidden % m == 0 and all(ls.ffn % m == 0 for ls in spec.to_config(config).layers if ls.kind == "mlp")
    # a budget inside the range that no width on a coarse grid meets: the message says that, not "out of range"
    with pytest.raises(ArchError, match=r"multiples of 64 lands within it .* lower width_multiple") as e:
        closest_homogeneous(config, parse_target("0.97"), tolerance=0.001, width_multiple=64)
    assert "give a budget in that range" not in str(e.value)
    # the axes' choices: fractions round to the multiple, a count must be one, the parent's own width is kept
    got = resolve_choices(config, {"hidden": [1.0, 0.7, 0.5], "mlp": [0.33]}, width_multiple=8)
    assert got == {"hidden": [96, 64, 48], "mlp": [200, 64]}
    with pytest.raises(ArchError, match=r"mlp choice 100 gives 100, not a multiple of 8 .*width_multiple: 1"):
        resolve_choices(config, {"mlp": [100]})
    assert resolve_choices(config, {"mlp": [100]}, width_multiple=1) == {"mlp": [200, 100]}


# --------------------------------------------------------------------------- invalid specs
C = cfg()  # layers: 0 M, 1 *, 2 -, 3 M, 4 -, 5 *, 6 M, 7 -
FULL = ArchSpec.full(C)


def _per_layer(i: int, d):
    layers = [{}] * C.n_layers
    layers[i] = d
    return ArchSpec.per_layer(C, C.hidden_size, layers)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FULL.replace(C, mamba_heads=3), r"layer 0 \(mamba\): mamba heads \(3\) must be a multiple of groups"),
        (lambda: _per_layer(3, {"heads": 5}), r"layer 3 \(mamba\): mamba heads \(5\) must be a multiple of groups"),
        (
            lambda: ArchSpec(
                64, [LayerSpec("mamba", heads=6, head_dim=8, groups=3, d_state=16)] + C.layers[1:]
            ).validate(C),
            r"layer 0 \(mamba\): groups and d_state are not elastic",
        ),
        (
            lambda: FULL.replace(C, attn_heads=6),
            r"layer 1 \(attention\): attention heads \(6\) must be a multiple of kv_heads",
        ),
        (
            lambda: _per_layer(5, {"heads": 4, "kv_heads": 3}),
            r"layer 5 \(attention\): attention heads \(4\) .* kv_heads \(3\)",
        ),
        (lambda: FULL.replace(C, mlp=129), r"layer 2 \(mlp\): MLP width 129 exceeds the parent's 128"),
        (lambda: FULL.replace(C, mamba_heads=10), r"layer 0 \(mamba\): 10 Mamba heads exceed the parent's 8"),
        (lambda: FULL.replace(C, mamba_head_dim=9), r"layer 0 \(mamba\): Mamba head_dim 9 exceeds the parent's 8"),
        (
            lambda: FULL.replace(C, kv_heads=5, attn_heads=10),
            r"layer 1 \(attention\): 5 KV heads exceed the parent's 4",
        ),
        (
            lambda: FULL.replace(C, kv_heads=2),
            r"layer 1 \(attention\): 4 query heads per KV group exceed the parent's 2",
        ),
        (lambda: _per_layer(1, {"head_dim": 4}), r"layer 1 \(attention\): attention head_dim is not elastic"),
        (lambda: FULL.replace(C, hidden=65), r"hidden 65 must be within 1\.\.64"),
        (lambda: FULL.replace(C, hidden=0), r"hidden 0 must be within"),
        (lambda: ArchSpec(32.0, FULL.layers).validate(C), r"hidden 32\.0 must be"),
        (lambda: FULL.replace(C, mlp=0), r"layer 2 \(mlp\): mlp layer needs a positive int 'ffn', got 0"),
        (lambda: FULL.replace(C, drop_layers=list(range(8))), r"must keep at least one layer"),
        (lambda: FULL.replace(C, drop_layers=[8]), r"drop_layers has index 8; layers are 0\.\.7"),
        (lambda: ArchSpec(64, FULL.layers[:-1]).validate(C), r"ArchSpec has 7 layers; the parent has 8"),
        (lambda: ArchSpec.per_layer(C, 64, [{}] * 9), r"per-layer spec has 9 entries; the parent has 8 layers"),
        (
            lambda: ArchSpec(64, [LayerSpec("mlp", ffn=8)] + C.layers[1:]).validate(C),
            r"layer 0 \(mamba\): ArchSpec says 'mlp'; a layer's kind cannot change",
        ),
        (lambda: _per_layer(2, {"kind": "attention"}), r"layer 2 \(mlp\): per-layer spec says kind 'attention'"),
        (lambda: _per_layer(2, {"heads": 2}), r"layer 2 \(mlp\): mlp layer takes no 'heads'"),
        (lambda: _per_layer(0, {"ffn_size": 2}), r"layer 0 \(mamba\): unknown key 'ffn_size'"),
        (lambda: ArchSpec(64, [{"heads": 2}] + C.layers[1:]).validate(C), r"layer 0 \(mamba\): expected a LayerSpec"),
        (
            lambda: ArchSpec.from_dict({"hidden": 64, "layers": [{"kind": "mamba", "heads": 3}] + [None] * 7}, C),
            r"layer 0 \(mamba\): mamba layer needs a positive int 'head_dim'",
        ),
    ],
)
def test_invalid_specs_name_the_layer_and_field(make, match):
    with pytest.raises(ArchError, match=match) as e:
        make()
    assert isinstance(e.value, NestlmError)  # the CLI prints it as one line, no traceback
    assert "\n" not in str(e.value)


def test_valid_edge_specs_pass():
    """The smallest of everything validates: 1 hidden channel, 1 head per group, 1 channel per head."""
    spec = FULL.replace(C, hidden=1, mamba_heads=2, mamba_head_dim=1, attn_heads=1, kv_heads=1, mlp=1)
    assert spec.validate(C) is spec
    assert spec.num_parameters(C) == built_count(spec.to_config(C))
