"""The two-level dual-stream advantage estimator for verl (``algorithm.adv_estimator=tsparse_dualstream``).

verl hands a registered estimator ``token_level_rewards [N, R]``, ``response_mask [N, R]``,
``config`` (``algorithm``) and ``index`` (the batch's ``uid`` of each sequence). The
dual-stream rollout (:mod:`.rollout`) writes each sequence's GRPO group into that ``uid``
(:func:`group_uid`):

* localization rollout O_i of question q: ``"<q>"`` - the G localization rollouts of q are
  one group;
* sparse rollout O'_{i,j}: ``"<q>#<i>"`` - one group per localization rollout
  (``advantages.sparse_group: localization``, the method's grouping) - or ``"<q>#*"`` - all
  G*G' sparse rollouts of q in one group (``sparse_group: question``).

Within each group the advantage is :func:`tsparse.dualstream.advantages.grpo_advantages`
(verl's ``compute_grpo_outcome_advantage``: ``(score - mean) / (std + 1e-6)``, or centred only
with ``algorithm.norm_adv_by_std_in_grpo=False``), broadcast over the response tokens. The
estimator is registered under a name of its own because verl 0.9.1's v1 trainer special-cases
``grpo`` (only the last output of each ``{uid}_{session}`` counts), which would drop every
sparse rollout but the last of a session.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ...dualstream.advantages import LOCALIZATION, SPARSE, expand_to_tokens, grpo_advantages

__all__ = ["ESTIMATOR_NAME", "group_uid", "stream_of_uid", "compute_dualstream_advantage"]

ESTIMATOR_NAME = "tsparse_dualstream"
_SEP = "#"


def group_uid(question_uid: str, stream: int, parent: Optional[int] = None, *, sparse_group: str = "localization") -> str:
    """The ``uid`` the dual-stream rollout writes for a sequence (see the module docstring)."""
    q = str(question_uid)
    if _SEP in q:
        raise ValueError(f"`question_uid` must not contain {_SEP!r}, got {q!r}")
    if stream == LOCALIZATION:
        return q
    if stream != SPARSE:
        raise ValueError(f"`stream` must be {LOCALIZATION} (localization) or {SPARSE} (sparse), got {stream!r}")
    if sparse_group == "question":
        return f"{q}{_SEP}*"
    if sparse_group != "localization":
        raise ValueError(f"`sparse_group` must be 'localization' or 'question', got {sparse_group!r}")
    if parent is None or int(parent) < 0:
        raise ValueError("a sparse rollout's group needs its localization rollout index `parent` >= 0")
    return f"{q}{_SEP}{int(parent)}"


def stream_of_uid(uid: str) -> int:
    """0 (localization) or 1 (sparse) from a :func:`group_uid`."""
    return SPARSE if _SEP in str(uid) else LOCALIZATION


def _group_ids(index: Sequence) -> Tensor:
    keys = [str(u) for u in (index.tolist() if isinstance(index, np.ndarray) else index)]
    table: dict = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.int64)


def compute_dualstream_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    config=None,
    index: Optional[Sequence] = None,
    epsilon: float = 1e-6,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``tsparse_dualstream``: GRPO within the two-level groups
    encoded in ``index``. Returns ``(advantages, returns)`` ``[N, R]`` (equal, as verl's GRPO)."""
    if index is None:
        raise ValueError(f"algorithm.adv_estimator={ESTIMATOR_NAME} needs the batch's `uid` (the GRPO group index)")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"`index` has {len(index)} entries for {token_level_rewards.shape[0]} sequences")
    norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.sum(dim=-1)  # as verl's compute_grpo_outcome_advantage
    with torch.no_grad():
        adv = grpo_advantages(scores, _group_ids(index).to(scores.device), epsilon=epsilon, norm_adv_by_std=norm)
        adv = expand_to_tokens(adv.to(token_level_rewards.dtype), response_mask)
    return adv, adv
