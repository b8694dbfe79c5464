"""The custom code an exported family directory carries (``nestlm export-hf``), kept here as plain files.

``nestlm.interop.family`` copies them next to the weights: ``configuration_nestlm.py``, ``nested.py`` and the
family's modeling file (``modeling_nemotron_h.py`` or ``modeling_transformer.py``, written as
``modeling_nestlm.py``). They import only torch and transformers, never nestlm (the directory must run where
nestlm is not installed), and nothing in nestlm imports them.
"""
