"""Evaluation: perplexity, synthetic reasoning problems with checkable answers, reports.

Submodules are imported on use (``from nestlm.eval import perplexity``); the reasoning problems live
in ``nestlm.tasks.reasoning`` (``nestlm.eval.reasoning`` re-exports them).
"""
