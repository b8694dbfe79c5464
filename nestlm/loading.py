"""``nestlm.load``: a HybridLM from any directory nestlm reads.

nestlm directories (plain, elastic or sliced) are read by the checkpoint owner
(``nestlm.checkpoint``), Hugging Face directories (NemotronH, llama, mistral, qwen2, qwen3) by ``nestlm.interop``; this
module only dispatches on ``model_type`` and builds the model from what they return.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import check_state_dict, read_config_json, read_nestlm
from .interop.formats import load_hf
from .model import HybridLM


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> HybridLM:
    """Load a nestlm directory (plain, elastic or sliced) or a Hugging Face directory: NemotronH,
    llama, mistral, qwen2 or qwen3."""
    path = Path(path)
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    if model_type == "nestlm":
        files = read_nestlm(path, raw)
        with torch.device("meta"):
            model = HybridLM(files.config)
        check_state_dict(model, files.tensors, lambda k: files.where[k])
        model.load_state_dict(files.tensors, assign=True)
        model.elastic = files.budgets
        model.importance = files.importance
    else:  # Hugging Face formats; unknown model types are refused there, in one line
        model = load_hf(path, raw)
    model.source_dir = str(path)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)
