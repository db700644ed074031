"""verl entry point for the dual-stream reward, loadable BY FILE PATH.

verl loads ``reward.custom_reward_function.path`` with ``spec_from_file_location`` without
registering the module, which dataclass-defining modules cannot survive; this file only
re-exports :func:`tsparse.dualstream.rewards.compute_score` (``name=compute_score``).
``pkg://tsparse.dualstream.rewards`` works as well.
"""

from tsparse.dualstream.rewards import compute_score

__all__ = ["compute_score"]
