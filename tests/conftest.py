"""Shared fixtures: tiny Hugging Face NemotronH checkpoints built from configs (no downloads)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The layer types of a NemotronH config (transformers >= 5 names).
M, A, F = "linear_attention", "full_attention", "mlp"

# A NemotronH shape whose widths are not powers of two (3 Mamba groups, 3 KV heads).
ODD_WIDTHS = dict(
    hidden_size=45,
    mamba_num_heads=9,
    mamba_head_dim=7,
    n_groups=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=10,
    intermediate_size=37,
    ssm_state_size=12,
)


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    """transformers logs a 'falling back to the PyTorch implementation' line per Mamba layer on CPU."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Ff]alling back.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread and do not stall when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(**kw):
    """A tiny NemotronHConfig: GQA attention, 2 Mamba groups, chunk 16, no EOS; ``kw`` overrides."""
    from transformers import NemotronHConfig

    args = dict(
        vocab_size=101,
        hidden_size=48,
        layers_block_type=[M, F, A, M, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=56,
        mamba_num_heads=6,
        mamba_head_dim=10,
        n_groups=2,
        ssm_state_size=16,
        chunk_size=16,
        eos_token_id=None,
        # Weights large enough that every mixer moves the logits well above the 1e-4
        # tolerance (at the default 0.02 a wrong dt clamp changes them by ~1e-6 only).
        initializer_range=0.1,
    )
    args.update(kw)
    return NemotronHConfig(**args)


def make_hf(path: Path, seed: int = 0, tie: bool = False, dtype: torch.dtype | None = None, **kw) -> Path:
    """A random NemotronH (transformers) saved to ``path`` with ``save_pretrained``; returns ``path``.

    Norm weights, D, conv biases and A_log are randomised too, so that no parameter sits
    at a value (1, 0, arange) that would hide a permutation bug; dt_bias keeps
    transformers' random init (softplus(dt_bias) log-uniform in [time_step_min, time_step_max]),
    so dt = softplus(x + dt_bias) often runs below time_step_min; with transformers' default
    time_step_limit (0, inf) nothing clamps it, and ``time_step_limit=(lo, hi)`` clamps it.
    ``tie=True`` makes lm_head an equal copy of the embeddings (transformers' NemotronH
    never ties them itself), which nestlm loads as a tied model.
    """
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith((".D", "conv1d.bias")):
                p.copy_(torch.randn_like(p))
            elif name.endswith(".A_log"):
                p.copy_(torch.randn_like(p) * 0.5)
        if tie:
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits without its cache (its DynamicCache fails on an all-Mamba model)."""
    with torch.no_grad():
        return hf(ids, use_cache=False).logits


def dir_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: equal before and after means nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_refused_in_one_line(capsys, tmp_path: Path, model_dir: Path, command: str, needle: str) -> None:
    """``nestlm importance`` or ``generate`` on ``model_dir``: exit 2, one ``nestlm: error:`` line holding
    ``needle``, no traceback, nothing written under ``tmp_path``."""
    from nestlm.cli import main

    before = dir_state(tmp_path)
    argv = {
        "importance": ["importance", "--model", str(model_dir), "--data", "stdlib", "--out", str(tmp_path / "out")],
        "generate": ["generate", "--model", str(model_dir), "--prompt", "hi"],
    }[command]
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nestlm: error: ") and needle in lines[0], err
    assert "Traceback" not in err and out == ""
    assert dir_state(tmp_path) == before and not (tmp_path / "out").exists()
