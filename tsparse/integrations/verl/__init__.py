"""tsparse in verl 0.9.1 (Ray + FSDP + vLLM), by flag.

Install tsparse into the verl environment (``pip install --no-build-isolation .``): its
``verl.plugins`` entry point (:mod:`.plugin`) registers on ``import verl``:

* policy losses ``tsparse`` (verl's vanilla PPO/GRPO loss, per-token math in tsparse's fused
  GRPO kernel) and ``tsparse_dualstream`` (the decoupled two-stream objective) -
  :mod:`.losses`;
* the advantage estimator ``tsparse_dualstream`` (two-level GRPO groups) - :mod:`.advantages`;
* the dispatcher of the flag. Registration alone changes no verl behaviour.

The flag - ``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=tsparse`` (per-op switches in the
same dict, :mod:`.options`) - swaps tsparse into the actor and reference engines
(:mod:`.patches`): fused log-probs / entropy in the model forward, tsparse's varlen packing,
and visual-token pruning in the Qwen2.5-VL forward (:mod:`.model_forward`). Off: nothing of
verl is replaced.

Also here: the dual-stream rollout on the actor model (:mod:`.rollout`), the ViTAR-16K JSON to
verl-parquet converter (:mod:`.data`, ``python -m tsparse.integrations.verl.data``), and the
stage configs in ``configs/verl/``.

verl is imported lazily (inside functions), so importing this package does not import verl.
"""

from .options import BACKEND, CONFIG_PREFIX, TsparseOptions, options_from_model_config
from .patches import (
    DISPATCH_TARGET,
    PATCH_TARGETS,
    VARLEN_TARGETS,
    apply_tsparse_to_verl,
    is_patched,
    patched_targets,
    unpatch,
)

#: ``reward.custom_reward_function`` for the composite dual-stream reward (verl loads it by path).
REWARD_FUNCTION = {"path": "pkg://tsparse.dualstream.reward_fn", "name": "compute_score"}

__all__ = [
    "BACKEND",
    "CONFIG_PREFIX",
    "TsparseOptions",
    "options_from_model_config",
    "PATCH_TARGETS",
    "VARLEN_TARGETS",
    "DISPATCH_TARGET",
    "apply_tsparse_to_verl",
    "unpatch",
    "is_patched",
    "patched_targets",
    "REWARD_FUNCTION",
]
