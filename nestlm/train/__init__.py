"""Training: data pipeline (data.py), losses, recipes, the elastic trainer and its stages, distributed setup.

Submodules are imported on use (``from nestlm.train import data``) so that importing this
package stays cheap.
"""
