"""Evaluation: perplexity, synthetic reasoning problems with checkable answers, reports.

Submodules are imported on use (``from nestlm.eval import reasoning``).
"""
