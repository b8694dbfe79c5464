"""nestlm: train one hybrid Mamba-Attention LM with smaller models nested inside it."""

from .checkpoint import load, save_pretrained
from .config import LayerSpec, ModelConfig
from .errors import CheckpointError, NestlmError
from .interop import export_hf
from .model import HybridLM, ModelOutput

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "HybridLM",
    "LayerSpec",
    "ModelConfig",
    "ModelOutput",
    "NestlmError",
    "export_hf",
    "load",
    "save_pretrained",
]
