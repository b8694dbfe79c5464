"""Configurations of a nestlm elastic family (written by ``nestlm export-hf``): the parent family's own config.

Each class is its family's transformers config, unchanged; config.json adds ``nestlm_budgets`` (every frozen
budget: its architecture and exact counts), which transformers keeps as an attribute. This file imports only
transformers.
"""

from transformers import LlamaConfig, MistralConfig, NemotronHConfig, Qwen2Config, Qwen3Config


class NestedNemotronHConfig(NemotronHConfig):
    """NemotronH (hybrid Mamba2 / attention / MLP or MoE) with nested budgets."""


class NestedLlamaConfig(LlamaConfig):
    """Llama with nested budgets."""


class NestedMistralConfig(MistralConfig):
    """Mistral with nested budgets."""


class NestedQwen2Config(Qwen2Config):
    """Qwen2 with nested budgets."""


class NestedQwen3Config(Qwen3Config):
    """Qwen3 with nested budgets."""
