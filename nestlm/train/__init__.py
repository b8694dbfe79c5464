"""Training: data sources and loader, losses, recipes, schedules, the checkpointer, the trainer, distributed setup.

Submodules are imported on use (``from nestlm.train import sources``) so that importing this
package stays cheap.
"""
