"""Hugging Face formats <-> nestlm.

``formats`` maps a ``model_type`` to its reader and writer (``load_hf``, ``export_hf``,
``hf_config_dict``); ``nemotron_h`` and ``llama`` (llama, mistral, qwen2, qwen3) are the
families; ``family`` writes an elastic model as one directory holding every budget, with the
custom code kept in ``hf_family/`` (``nestlm export-hf``). This package file imports none of
them, so that importing one family never runs the others (and no import cycle runs through the
package).
"""
