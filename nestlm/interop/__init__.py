"""Hugging Face formats <-> nestlm."""

from .nemotron_h import export_hf, load_hf

__all__ = ["export_hf", "load_hf"]
