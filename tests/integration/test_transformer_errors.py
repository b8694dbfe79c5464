"""Transformer directories nestlm cannot run exactly are refused: one line naming the feature, exit 2, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nestlm.cli import main
from tests.conftest import assert_refused_in_one_line, dir_state
from tests.transformer_models import make_transformer


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_transformer(tmp_path_factory.mktemp("good") / "llama", "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_transformer(tmp_path_factory.mktemp("good") / "qwen2", "qwen2", num_hidden_layers=2)


def _edit(d: Path, **kw) -> None:
    raw = json.loads((d / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (d / "config.json").write_text(json.dumps(raw))


def _rope(rope_type: str, **extra) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0, **extra}}


CASES = {
    # name: (source, config edits, what the line must say)
    "mixtral": ("llama", {"model_type": "mixtral"}, "model_type 'mixtral', a mixture-of-experts Transformer"),
    "qwen3_moe": ("qwen2", {"model_type": "qwen3_moe"}, "model_type 'qwen3_moe', a mixture-of-experts Transformer"),
    "gpt2": ("llama", {"model_type": "gpt2"}, "has model_type 'gpt2'; nestlm reads 'nestlm', 'nemotron_h'"),
    "rope-linear": (
        "llama",
        _rope("linear"),
        "RoPE type 'linear' is not supported (nestlm implements default, llama3)",
    ),
    "rope-dynamic": ("llama", _rope("dynamic"), "RoPE type 'dynamic' is not supported"),
    "rope-yarn-old-spelling": (
        "qwen2",
        {"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}},
        "RoPE type 'yarn' is not supported",
    ),
    "partial-rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    "llama3-incomplete": ("llama", _rope("llama3"), "llama3 RoPE scaling lacks 'low_freq_factor'"),
    "mistral-window": (
        "llama",
        {"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 512},
        "sliding-window attention (window 64 < context 512) is not supported",
    ),
    "qwen2-window-used": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1, "layer_types": None},
        "sliding-window attention (window 64 < context 512) is not supported",
    ),
    "qwen2-layer-types-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]},
        "sliding-window attention",
    ),
    "gelu": ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (only silu"),
    "lacks-key": ("qwen2", {"intermediate_size": None}, "lacks 'intermediate_size', which a qwen2 config needs"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["importance", "generate"])
def test_unsupported_feature_is_one_line_exit_2_nothing_written(
    llama: Path, qwen2: Path, tmp_path: Path, case: str, command: str, capsys
) -> None:
    import shutil

    source, edits, needle = CASES[case]
    d = tmp_path / "m"
    shutil.copytree(llama if source == "llama" else qwen2, d)
    _edit(d, **edits)
    assert_refused_in_one_line(capsys, tmp_path, d, command, needle)


def test_tied_flag_with_a_different_head_is_refused(llama: Path, tmp_path: Path, capsys) -> None:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama, d)
    _edit(d, tie_word_embeddings=True)
    before = dir_state(tmp_path)
    rc = main(["generate", "--model", str(d), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "lm_head.weight differs from the embeddings" in err
    assert dir_state(tmp_path) == before


def test_unknown_tensor_is_named(llama: Path, tmp_path: Path, capsys) -> None:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    rc = main(["generate", "--model", str(d), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "unexpected tensor 'model.layers.0.mlp.experts.0.weight' in model.safetensors" in err
