"""The synthetic reasoning problems now live in ``nestlm.tasks.reasoning`` (training uses them too).

Re-exported here so that ``from nestlm.eval import reasoning`` keeps working.
"""

from ..tasks.reasoning import *  # noqa: F403
