"""Progress bars only on a terminal: logs, pipes and CI files get none (every ``--no-progress`` turns them off too)."""

from __future__ import annotations

import sys


def show_progress(progress: bool = True) -> bool:
    """Whether to draw a progress bar: asked for, and stderr (where tqdm draws) is a terminal."""
    if not progress:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False
