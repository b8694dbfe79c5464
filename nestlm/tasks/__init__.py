"""Tasks shared by training and evaluation: synthetic reasoning problems with checkable answers.

Submodules are imported on use (``from nestlm.tasks import reasoning``).
"""
