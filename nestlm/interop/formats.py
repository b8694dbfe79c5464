"""Hugging Face formats <-> nestlm: the one place that maps a model_type to its reader and writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import family as family_dir
from . import llama, nemotron_h

FAMILIES = {"nemotron_h": nemotron_h, **{t: llama for t in llama.MODEL_TYPES}}
# Mixture-of-experts Transformers (and others users ask for) are refused by name.
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4", "olmoe", "dbrx")
SUPPORTED = "'nestlm', 'nemotron_h' (NemotronH) and the Transformers 'llama', 'mistral', 'qwen2', 'qwen3'"


def family(model_type: Any, where: str) -> Any:
    """The interop module for ``model_type``, or a one-line CheckpointError naming what is supported."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in MOE_TYPES:
        raise CheckpointError(
            f"{where} has model_type {model_type!r}, a mixture-of-experts Transformer, which is not supported; "
            f"nestlm reads {SUPPORTED}"
        )
    raise CheckpointError(f"{where} has model_type {model_type!r}; nestlm reads {SUPPORTED} models")


def load_hf(path: str | Path, raw: dict[str, Any]) -> Any:
    """Load a Hugging Face directory whose config.json is ``raw``; a family directory (export-hf) with its budgets."""
    path = Path(path)
    where = str(path / "config.json")
    model = family(raw.get("model_type"), where).load_hf(path, raw)
    model.elastic = family_dir.budgets_from_config(raw, model.config, where)
    for key in family_dir.OWN_KEYS:  # budgets and custom code belong to this directory, not to what it exports
        (model.config.hf_config or {}).pop(key, None)
    return model


def _export_family(cfg: Any) -> Any:
    src = cfg.hf_config or {}
    return llama if src.get("model_type") in llama.MODEL_TYPES else nemotron_h


def hf_config_dict(cfg: Any) -> dict[str, Any]:
    """The config.json export_hf would write for ``cfg`` (raises its one-line error first)."""
    return _export_family(cfg).hf_config_dict(cfg)


def export_hf(model: Any, path: str | Path, overwrite: bool = False, **family_options: Any) -> None:
    """Write ``model`` in the Hugging Face format of its source: a sliced Qwen3 is a Qwen3 directory.

    Models without a Transformer source (NemotronH parents, models built in nestlm) are written as NemotronH.
    An elastic model (frozen budgets) is written as ONE family directory holding every budget, with the custom
    code that runs them (``nestlm.interop.family``; ``family_options``: ``max_shard_bytes``, ``dtype``).
    """
    if getattr(model, "elastic", None):
        family_dir.export_family(model, path, overwrite=overwrite, **family_options)
    else:
        _export_family(model.config).export_hf(model, path, overwrite=overwrite)


__all__ = ["FAMILIES", "export_hf", "hf_config_dict", "load_hf"]
