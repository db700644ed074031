"""Two-level GRPO advantages of the dual-stream method, and the per-token stream ids the
decoupled loss (``tsparse.ops.grpo_loss(..., stream=...)``) takes.

Groups (method note): each question q has G localization rollouts O_1..O_G - one GRPO group;
each O_i has G' sparse rollouts O'_{i,1..G'} - one GRPO group per O_i
(``sparse_group="localization"``, the default), or all G*G' sparse rollouts of q form one
group (``"question"``). Within each group the advantage of a sequence is verl 0.9.1's
``compute_grpo_outcome_advantage``: ``(score - mean) / (std + eps)`` with the unbiased std
(``score - mean`` when ``norm_adv_by_std`` is off); a group of one has mean 0 and std 1.

Note: a reward term that is constant within a group (e.g. the sparse rollouts' cross-feedback
term, the parent's accuracy, under per-localization groups) shifts the group mean by the same
amount and leaves the advantages unchanged.

Sequence order used by :meth:`DualStreamAdvantages.flat`: all localization sequences
(q-major, then i), then all sparse sequences (q, then i, then j). Stream ids:
:data:`LOCALIZATION` = 0, :data:`SPARSE` = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .config import AdvantageConfig

__all__ = [
    "LOCALIZATION",
    "SPARSE",
    "grpo_advantages",
    "DualStreamAdvantages",
    "dual_stream_advantages",
    "expand_to_tokens",
    "expand_to_packed",
]

LOCALIZATION = 0
SPARSE = 1

ArrayLike = Union[Tensor, Sequence]


def _as_float(x: ArrayLike, arg: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float32)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{arg}` must be finite")
    return t


def grpo_advantages(
    scores: ArrayLike,
    group_ids: ArrayLike,
    *,
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> Tensor:
    """GRPO outcome advantages of sequences grouped by ``group_ids``.

    Args:
        scores: ``[N]`` per-sequence rewards (any float dtype or a list; computed in float32).
        group_ids: ``[N]`` int group id of each sequence (any ints; equal id = same group).
        epsilon: added to the std (> 0).
        norm_adv_by_std: divide by ``std + epsilon`` (GRPO) or only centre (Dr.GRPO).

    Returns float32 ``[N]`` on ``scores``' device, equal to verl 0.9.1's
    ``compute_grpo_outcome_advantage`` on one-token responses. ``ValueError`` for mismatched
    lengths, non-finite scores or a bad ``epsilon``.
    """
    s = _as_float(scores, "scores").reshape(-1)
    g = group_ids if isinstance(group_ids, Tensor) else torch.tensor(list(group_ids), dtype=torch.int64)
    g = g.reshape(-1).to(device=s.device)
    if g.is_floating_point() or g.dtype == torch.bool:
        raise TypeError(f"`group_ids` must be integers, got {g.dtype}")
    if g.numel() != s.numel():
        raise ValueError(f"`group_ids` has {g.numel()} entries for {s.numel()} scores")
    if not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}")
    if s.numel() == 0:
        return s.clone()
    _, inv = torch.unique(g, return_inverse=True)
    k = int(inv.max()) + 1
    count = torch.zeros(k, dtype=torch.float32, device=s.device).index_add_(0, inv, torch.ones_like(s))
    mean = torch.zeros(k, dtype=torch.float32, device=s.device).index_add_(0, inv, s) / count
    dev = s - mean[inv]
    var = torch.zeros(k, dtype=torch.float32, device=s.device).index_add_(0, inv, dev * dev) / (count - 1).clamp(min=1)
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    centred = s - mean[inv]
    return centred / (std[inv] + float(epsilon)) if norm_adv_by_std else centred


@dataclass(frozen=True)
class DualStreamAdvantages:
    """Per-sequence advantages of both streams.

    ``localization``: float32 ``[Q, G]``; ``sparse``: float32 ``[Q, G, G']`` or ``None``
    (no sparse stream, e.g. stage 1); ``localization_groups`` / ``sparse_groups``: the int64
    group id of each sequence, same shapes.
    """

    localization: Tensor
    sparse: Optional[Tensor]
    localization_groups: Tensor
    sparse_groups: Optional[Tensor]

    def flat(self) -> tuple[Tensor, Tensor]:
        """``(advantages [N], stream [N])``: localization sequences first (q, i), then sparse
        ones (q, i, j); stream 0 = localization, 1 = sparse (int64)."""
        parts = [self.localization.reshape(-1)]
        streams = [torch.full((self.localization.numel(),), LOCALIZATION, dtype=torch.int64)]
        if self.sparse is not None:
            parts.append(self.sparse.reshape(-1))
            streams.append(torch.full((self.sparse.numel(),), SPARSE, dtype=torch.int64))
        adv = torch.cat(parts)
        return adv, torch.cat(streams).to(adv.device)


def dual_stream_advantages(
    localization_rewards: ArrayLike,
    sparse_rewards: Optional[ArrayLike] = None,
    *,
    config: Optional[AdvantageConfig] = None,
    sparse_group: Optional[str] = None,
    epsilon: Optional[float] = None,
    norm_adv_by_std: Optional[bool] = None,
) -> DualStreamAdvantages:
    """Two-level GRPO advantages.

    Args:
        localization_rewards: ``[Q, G]`` rewards of the G localization rollouts per question.
        sparse_rewards: ``[Q, G, G']`` rewards of the sparse rollouts (``[q, i, j]`` = O'_{i,j}
            of question q), or ``None``.
        config: an :class:`~tsparse.dualstream.config.AdvantageConfig` (``sparse_group``,
            ``epsilon``, ``norm_adv_by_std``); the keyword arguments override it.

    Localization groups: one per question. Sparse groups: one per localization rollout
    (``sparse_group="localization"``) or one per question (``"question"``). Raises
    ``ValueError`` for wrong ranks, mismatched ``Q``/``G`` or non-finite rewards.
    """
    cfg = config if config is not None else AdvantageConfig()
    if not isinstance(cfg, AdvantageConfig):
        raise TypeError(f"`config` must be an AdvantageConfig or None, got {type(cfg).__name__}")
    sparse_group = cfg.sparse_group if sparse_group is None else sparse_group
    if sparse_group not in ("localization", "question"):
        raise ValueError(f"`sparse_group` must be 'localization' or 'question', got {sparse_group!r}")
    eps = cfg.epsilon if epsilon is None else epsilon
    norm = cfg.norm_adv_by_std if norm_adv_by_std is None else norm_adv_by_std

    loc = _as_float(localization_rewards, "localization_rewards")
    if loc.dim() != 2:
        raise ValueError(f"`localization_rewards` must be [Q, G], got shape {tuple(loc.shape)}")
    q, g = loc.shape
    loc_groups = torch.arange(q, device=loc.device).view(q, 1).expand(q, g)
    loc_adv = grpo_advantages(loc.reshape(-1), loc_groups.reshape(-1), epsilon=eps, norm_adv_by_std=norm).view(q, g)
    sp_adv = sp_groups = None
    if sparse_rewards is not None:
        sp = _as_float(sparse_rewards, "sparse_rewards").to(loc.device)
        if sp.dim() != 3 or sp.shape[:2] != (q, g):
            raise ValueError(f"`sparse_rewards` must be [Q, G, G'] = [{q}, {g}, G'], got shape {tuple(sp.shape)}")
        gp = sp.shape[2]
        if sparse_group == "localization":
            sp_groups = torch.arange(q * g, device=loc.device).view(q, g, 1).expand(q, g, gp)
        else:
            sp_groups = torch.arange(q, device=loc.device).view(q, 1, 1).expand(q, g, gp)
        sp_adv = grpo_advantages(sp.reshape(-1), sp_groups.reshape(-1), epsilon=eps,
                                 norm_adv_by_std=norm).view(q, g, gp)
        sp_groups = sp_groups.contiguous()
    return DualStreamAdvantages(loc_adv, sp_adv, loc_groups.contiguous(), sp_groups)


def expand_to_tokens(values: Tensor, response_mask: Tensor) -> Tensor:
    """Per-sequence values ``[N]`` -> per-token ``[N, R]`` (the value on masked-in tokens, 0
    elsewhere; as verl's ``scores.unsqueeze(-1) * response_mask``). Integer values (stream
    ids) are broadcast to every token, mask or not, so a stream id is never out of range.
    ``ValueError`` when ``values`` is not ``[N]`` for a ``[N, R]`` mask."""
    if not isinstance(values, Tensor) or not isinstance(response_mask, Tensor):
        raise TypeError("`values` and `response_mask` must be tensors")
    if response_mask.dim() != 2 or values.shape != (response_mask.shape[0],):
        raise ValueError(f"`values` must be [N] for `response_mask` [N, R]; got {tuple(values.shape)} and "
                         f"{tuple(response_mask.shape)}")
    values = values.to(response_mask.device)
    if values.is_floating_point():
        return values[:, None] * response_mask.to(values.dtype)
    return values[:, None].expand(-1, response_mask.shape[1]).contiguous()


def expand_to_packed(values: Tensor, lengths: ArrayLike) -> Tensor:
    """Per-sequence values ``[N]`` -> per-token ``[T]`` for a packed (varlen) layout where
    sequence n contributes ``lengths[n]`` consecutive tokens (``T = sum(lengths)``)."""
    if not isinstance(values, Tensor) or values.dim() != 1:
        raise ValueError("`values` must be a 1-D tensor [N]")
    lens = lengths if isinstance(lengths, Tensor) else torch.tensor(list(lengths), dtype=torch.int64)
    lens = lens.to(device=values.device, dtype=torch.int64).reshape(-1)
    if lens.numel() != values.numel():
        raise ValueError(f"`lengths` has {lens.numel()} entries for {values.numel()} values")
    if bool((lens < 0).any()):
        raise ValueError("`lengths` must be >= 0")
    return torch.repeat_interleave(values, lens)
