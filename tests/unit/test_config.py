"""ModelConfig / LayerSpec: pattern sugar, JSON round trip, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from nestlm.config import ConfigError, LayerSpec, ModelConfig
from nestlm.errors import NestlmError

MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
LAYER_KEYS = ["kind", "heads", "head_dim", "groups", "d_state", "kv_heads", "ffn", "experts", "shared_ffn"]


def small(**kw) -> ModelConfig:
    args = dict(vocab_size=50, hidden_size=32, mamba_heads=4, mamba_head_dim=8, mamba_groups=2, d_state=16)
    args |= dict(attn_heads=4, kv_heads=2, attn_head_dim=8, ffn=64)
    return ModelConfig.from_pattern("M-M*-", **(args | kw))


def test_from_pattern_builds_one_spec_per_character() -> None:
    cfg = small()
    assert cfg.pattern == "M-M*-" and cfg.n_layers == 5
    assert cfg.layers[0] == LayerSpec("mamba", heads=4, head_dim=8, groups=2, d_state=16)
    assert cfg.layers[1] == LayerSpec("mlp", ffn=64)
    assert cfg.layers[3] == LayerSpec("attention", heads=4, kv_heads=2, head_dim=8)
    assert cfg.layers[0] == cfg.layers[2] and cfg.layers[1] == cfg.layers[4]
    # a field of another kind stays None, so to_dict lists exactly the kind's widths
    assert cfg.layers[3].to_dict() == {"kind": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8}


def test_json_round_trip_keeps_every_value() -> None:
    hf = {"model_type": "nemotron_h", "eos_token_id": [2, 11], "nested": {"a": [1.5, None, True]}}
    cfg = small(
        norm_eps=1e-6,
        tie_embeddings=True,
        mamba_chunk_size=32,
        mamba_dt_min=5e-4,
        eos_token_id=[2, 11],
        pad_token_id=0,
        hf_config=hf,
    )
    text = cfg.to_json()
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict() and back.hf_config == hf
    assert json.loads(text)["layers"][3] == {"kind": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8}
    assert back.to_json() == text  # stable: a second round trip writes the same bytes


def test_heterogeneous_layers_round_trip() -> None:
    het = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        layers=[
            LayerSpec("mamba", heads=6, head_dim=8, groups=3, d_state=16),
            LayerSpec("mamba", heads=3, head_dim=4, groups=3, d_state=16),
            LayerSpec("mlp", ffn=10),
            LayerSpec("mlp", ffn=20),
            LayerSpec("attention", heads=2, kv_heads=1, head_dim=6),
        ],
    )
    back = ModelConfig.from_json(het.to_json())
    assert back == het
    assert [ls.to_dict() for ls in back.layers] == [ls.to_dict() for ls in het.layers]
    assert back.layers[1].heads == 3 and back.layers[3].ffn == 20


def test_infinite_values_round_trip() -> None:
    cfg = small(rope_theta=math.inf)
    assert ModelConfig.from_json(cfg.to_json()).rope_theta == math.inf


def test_unknown_model_key_names_it_and_lists_valid_ones() -> None:
    data = small().to_dict()
    data["hiden_size"] = 3
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(data)
    msg = str(e.value)
    assert "'hiden_size'" in msg and "model config" in msg
    assert msg.endswith("valid keys: " + ", ".join(MODEL_KEYS))
    assert isinstance(e.value, NestlmError)  # the CLI prints it as one line


def test_unknown_layer_key_names_it_and_lists_valid_ones() -> None:
    data = small().to_dict()
    data["layers"][1]["width"] = 7
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(data)
    assert "'width'" in str(e.value) and str(e.value).endswith("valid keys: " + ", ".join(LAYER_KEYS))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_size", "32"),
        ("hidden_size", 0),
        ("vocab_size", True),
        ("mamba_chunk_size", 1.5),
        ("tie_embeddings", "yes"),
        ("norm_eps", "1e-5"),
        ("mamba_dt_min", None),
        ("rope_theta", "10000"),
        ("pad_token_id", 1.0),
        ("eos_token_id", "2"),
        ("eos_token_id", [2, "3"]),
        ("hf_config", [1]),
    ],
)
def test_wrong_type_names_the_key(key: str, value: object) -> None:
    data = small().to_dict()
    data[key] = value
    with pytest.raises(ConfigError, match=rf"^{key} must be "):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    ("layers", "needle"),
    [
        (3, "layers must be a list"),
        (["mlp"], r"layers\[0\] must be a layer spec"),
        ([{"ffn": 3}], "has no 'kind'"),
        ([{"kind": "conv", "ffn": 3}], "layer kind 'conv' is not one of mamba, attention, mlp, moe"),
        ([{"kind": "moe", "ffn": 3}], "moe layer needs a positive int 'experts', got None"),
        ([{"kind": "mlp", "ffn": "3"}], "mlp layer needs a positive int 'ffn'"),
        ([{"kind": "mlp"}], "mlp layer needs a positive int 'ffn', got None"),
        ([{"kind": "attention", "heads": 4, "kv_heads": 2, "head_dim": 8, "ffn": 3}], "takes no 'ffn'"),
        ([{"kind": "attention", "heads": 4, "kv_heads": 3, "head_dim": 8}], "multiple of kv_heads"),
        ([{"kind": "mamba", "heads": 5, "head_dim": 4, "groups": 2, "d_state": 8}], "multiple of groups"),
        ([], "at least one layer"),
    ],
)
def test_bad_layers_are_named(layers: object, needle: str) -> None:
    data = small().to_dict()
    data["layers"] = layers
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(data)


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match="model config has no 'layers'"):
        ModelConfig.from_dict({"vocab_size": 5, "hidden_size": 8})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mlp_act 'gelu' is not one of relu2, swiglu"):
        small(mlp_act="gelu")
    with pytest.raises(ConfigError, match="RoPE needs an even attention head_dim"):
        small(rope_theta=1e4, attn_head_dim=7)
    with pytest.raises(ConfigError, match=r"pattern character 'X' at position 1 is not one of 'M', '\*', '-'"):
        ModelConfig.from_pattern("MX", vocab_size=5, hidden_size=8)
