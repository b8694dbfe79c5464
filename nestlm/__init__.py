"""nestlm: train one hybrid Mamba-Attention LM with smaller models nested inside it."""

from .checkpoint import Budget, save_pretrained
from .compiler import compile_model
from .config import LayerSpec, ModelConfig
from .elastic.arch import ArchSpec, parse_target
from .elastic.importance import Importance, estimate_importance, reorder
from .errors import CheckpointError, NestlmError, UnknownBudgetError
from .interop.formats import export_hf
from .loading import load
from .model import HybridLM, ModelOutput
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "Budget",
    "Importance",
    "estimate_importance",
    "parse_target",
    "reorder",
    "CheckpointError",
    "HybridLM",
    "LayerSpec",
    "ModelConfig",
    "ModelOutput",
    "NestlmError",
    "UnknownBudgetError",
    "compile_model",
    "export_hf",
    "load",
    "load_tokenizer",
    "save_pretrained",
]
