"""verl policy losses backed by tsparse's fused GRPO op, and the decoupled dual-stream loss.

Registered by the plugin under verl's ``register_policy_loss`` (select with
``actor_rollout_ref.actor.policy_loss.loss_mode``):

* ``tsparse`` - verl 0.9.1's ``compute_policy_loss_vanilla`` (ratio with the ``[-20, 20]``
  log-ratio clamp, the two clipped surrogates, dual clip with ``clip_ratio_c``, rollout IS
  weights), per token in ONE tsparse kernel (the per-token stage of
  :func:`tsparse.ops.grpo_loss`, with its analytic derivative), aggregated by verl's own
  ``agg_loss`` with verl's global-batch normalization; same metrics.
* ``tsparse_dualstream`` - the paper's decoupled objective: the same per-token loss, each
  stream (0 = localization, 1 = sparse reasoning) aggregated over ITS OWN tokens of the
  mini-batch (``loss_agg_mode`` applied per stream, normalized by the stream's global token /
  sequence counts across data-parallel ranks), then ``sum_s w_s * agg_s``; one stream's token
  count or advantages never rescale the other's gradient.

verl's ``PolicyLossFn`` signature carries no per-sample data, so the dual-stream loss reads the
micro-batch's stream ids (batch field ``tsparse_stream``, int ``[B]``) and the mini-batch's
per-stream counts from :func:`stream_context`, which the engine hooks of
``impl_backend=tsparse`` (``stream_loss``, on by default) fill. Without them the loss raises
``ValueError`` naming the config keys.

Why not the whole fused ``grpo_loss`` on logits: with ``use_fused_kernels`` the engine never
materializes logits (tsparse's fused linear log-probs run inside the model forward, where FSDP
has the LM-head weight unsharded), and verl computes the loss afterwards from the log-probs.
The loss is therefore split at the per-token log-prob: the logits are read once (forward) and
written once (backward) by the fused log-prob op, and everything after is ``[T]``-sized.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "LOSS_NAME",
    "DUALSTREAM_LOSS_NAME",
    "STREAM_FIELD",
    "StreamBatchInfo",
    "stream_context",
    "current_stream_context",
    "compute_policy_loss_tsparse",
    "compute_policy_loss_dualstream",
    "grpo_token_terms",
]

LOSS_NAME = "tsparse"
DUALSTREAM_LOSS_NAME = "tsparse_dualstream"
#: Batch field with each sequence's stream id (int ``[B]``: 0 localization, 1 sparse).
STREAM_FIELD = "tsparse_stream"
NUM_STREAMS = 2
STREAM_NAMES = ("localization", "sparse")


@dataclass
class StreamBatchInfo:
    """What the decoupled loss needs beyond verl's ``PolicyLossFn`` arguments."""

    stream: Optional[Tensor] = None  #: int ``[b]`` stream of each micro-batch row
    tokens: Optional[Tensor] = None  #: float ``[S]`` loss tokens per stream in the global mini-batch
    sequences: Optional[Tensor] = None  #: float ``[S]`` sequences with >= 1 loss token, per stream
    weights: tuple = (1.0, 1.0)  #: ``w_s``


_CTX: contextvars.ContextVar = contextvars.ContextVar("tsparse_stream_batch", default=None)


def current_stream_context() -> Optional[StreamBatchInfo]:
    return _CTX.get()


@contextlib.contextmanager
def stream_context(**fields: Any):
    """Sets (merges into the current) :class:`StreamBatchInfo` for the duration of the block."""
    cur = _CTX.get()
    info = StreamBatchInfo(**{**(cur.__dict__ if cur is not None else {}), **fields})
    token = _CTX.set(info)
    try:
        yield info
    finally:
        _CTX.reset(token)


# --------------------------------------------------------------------------------------
def grpo_token_terms(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    is_weights: Optional[Tensor] = None,
):
    """Per-token ``(pg_loss, ratio, clipped, clipped_lower)`` of verl's vanilla PPO loss, in one
    tsparse kernel; ``pg_loss`` is differentiable in ``log_prob`` (the kernel's analytic
    derivative, registered as the op's autograd). The inputs broadcast against each other as in
    verl's ``compute_policy_loss_vanilla`` (e.g. per-sequence ``[b, 1]`` advantages or rollout IS
    weights beside ``[b, R]`` log-probs); the outputs have the broadcast shape."""
    from ...ops import grpo as _grpo

    tensors = [t for t in (log_prob, old_log_prob, advantages, is_weights) if t is not None]
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError as exc:
        raise ValueError(
            "tsparse policy loss: `log_prob` "
            f"{tuple(log_prob.shape)}, `old_log_prob` {tuple(old_log_prob.shape)}, `advantages` "
            f"{tuple(advantages.shape)}"
            + (f", `rollout_is_weights` {tuple(is_weights.shape)}" if is_weights is not None else "")
            + " do not broadcast together"
        ) from None
    lp = log_prob.expand(shape).reshape(-1)  # differentiable: the gradient sums back over broadcast dims
    if lp.dtype not in (torch.float32, torch.float64):
        lp = lp.to(torch.float32)
    acc = lp.dtype  # fp64 inputs stay fp64; anything else is computed in fp32

    def flat(t):
        return t.detach().to(acc).expand(shape).reshape(-1) if t is not None else None

    pg, _kl, ratio, flags, _, _, _ = torch.ops.tsparse.grpo_token_terms(
        lp, flat(old_log_prob), flat(advantages), None, flat(is_weights),
        float(clip_low), float(clip_high), float(clip_ratio_c), "low_var_kl", _grpo.CLAMP_EDGES,
    )
    flags = flags.view(shape)
    return pg.view(shape), ratio.view(shape), (flags & 1).bool(), ((flags >> 1) & 1).bool()


def _clip_params(config) -> tuple[float, float, float]:
    if config is None:
        raise ValueError("tsparse policy loss: `config` (the actor config) is required")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    c = config.get("clip_ratio_c", 3.0)
    if not c > 1.0:
        # verl's vanilla loss asserts this (AssertionError); a ValueError naming the key is the
        # documented difference (a bad config is a user's mistake, not an internal invariant).
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0, got {c}")
    return float(low), float(high), float(c)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    import verl.utils.torch_functional as verl_F

    return verl_F.masked_mean(x, mask)


def compute_policy_loss_tsparse(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
) -> tuple[Tensor, dict]:
    """verl ``PolicyLossFn`` ``tsparse``: verl's vanilla PPO/GRPO loss, per-token math in one
    tsparse kernel, verl's ``agg_loss`` (global-batch normalization from
    ``config.global_batch_info``). Shapes ``[b, R]``; returns ``(loss, metrics)`` with verl's
    metric names."""
    from verl.trainer.ppo.core_algos import agg_loss

    low, high, c = _clip_params(config)
    pg, ratio, clipped, clipped_lower = grpo_token_terms(
        log_prob, old_log_prob, advantages, clip_low=low, clip_high=high, clip_ratio_c=c,
        is_weights=rollout_is_weights,
    )
    pg = pg.to(log_prob.dtype) if log_prob.dtype != pg.dtype and log_prob.dtype == torch.float64 else pg
    loss = agg_loss(loss_mat=pg, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    with torch.no_grad():
        neg_kl = torch.clamp(log_prob.detach() - old_log_prob, -20.0, 20.0)
        metrics = {
            "actor/pg_clipfrac": _masked_mean(clipped.float(), response_mask).item(),
            "actor/ppo_kl": _masked_mean(-neg_kl, response_mask).item(),
            "actor/pg_clipfrac_lower": _masked_mean(clipped_lower.float(), response_mask).item(),
        }
    return loss, metrics


def _stream_agg(pg: Tensor, mask: Tensor, mode: str, tokens: Tensor, seqs: Tensor, dp_size: int,
                loss_scale_factor) -> Tensor:
    """verl's ``agg_loss`` for one stream, normalized by that stream's global counts."""
    mask = mask.to(pg.dtype)
    if mode == "token-mean":
        return (pg * mask).sum() / tokens.clamp(min=1) * dp_size if float(tokens) > 0 else (pg * mask).sum() * 0
    if mode == "token-sum":
        return (pg * mask).sum() * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (pg * mask).sum(-1)
        seq_mask = (mask.sum(-1) > 0).to(pg.dtype)
        loss = (seq_losses * seq_mask).sum() / seqs.clamp(min=1) * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
        return loss
    if mode == "seq-mean-token-mean":
        count = mask.sum(-1)
        seq_losses = (pg * mask).sum(-1) / (count + 1e-8)
        seq_mask = (count > 0).to(pg.dtype)
        return (seq_losses * seq_mask).sum() / seqs.clamp(min=1) * dp_size
    raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode: unsupported {mode!r} for {DUALSTREAM_LOSS_NAME}")


def compute_policy_loss_dualstream(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
) -> tuple[Tensor, dict]:
    """verl ``PolicyLossFn`` ``tsparse_dualstream``: the decoupled two-stream GRPO loss
    ``sum_s w_s * agg_s(pg)``, each stream normalized by its own global counts (see the module
    docstring). Per-stream metrics are reported as ``actor/pg_loss/<stream>``,
    ``actor/pg_clipfrac/<stream>`` and ``actor/tokens/<stream>``."""
    info = current_stream_context()
    if info is None or info.stream is None or info.tokens is None:
        raise ValueError(
            f"policy_loss.loss_mode={DUALSTREAM_LOSS_NAME} needs each sequence's stream: set "
            "actor_rollout_ref.model.use_fused_kernels=True, "
            "actor_rollout_ref.model.fused_kernel_options.impl_backend=tsparse (stream_loss on), and give the "
            f"batch a `{STREAM_FIELD}` field (the dual-stream rollout writes it)"
        )
    low, high, c = _clip_params(config)
    stream = info.stream.to(log_prob.device).reshape(-1)
    if stream.shape[0] != log_prob.shape[0]:
        raise ValueError(f"`{STREAM_FIELD}` has {stream.shape[0]} rows for a micro-batch of {log_prob.shape[0]}")
    pg, ratio, clipped, clipped_lower = grpo_token_terms(
        log_prob, old_log_prob, advantages, clip_low=low, clip_high=high, clip_ratio_c=c,
        is_weights=rollout_is_weights,
    )
    gbi = dict(config.global_batch_info)
    dp_size = int(gbi.get("dp_size", 1) or 1)
    lsf = gbi.get("loss_scale_factor")
    tokens = info.tokens.to(pg.device, pg.dtype)
    seqs = info.sequences.to(pg.device, pg.dtype) if info.sequences is not None else tokens
    weights = info.weights
    loss = pg.new_zeros(())
    metrics: dict = {}
    mask = response_mask.bool()
    for s in range(NUM_STREAMS):
        mask_s = mask & (stream[:, None] == s)
        agg = _stream_agg(pg, mask_s, loss_agg_mode, tokens[s], seqs[s], dp_size, lsf)
        loss = loss + float(weights[s]) * agg
        name = STREAM_NAMES[s]
        metrics[f"actor/pg_loss/{name}"] = float(agg.detach())
        metrics[f"actor/tokens/{name}"] = float(tokens[s])
        with torch.no_grad():
            metrics[f"actor/pg_clipfrac/{name}"] = _masked_mean(clipped.float(), mask_s).item() if mask_s.any() else 0.0
    with torch.no_grad():
        neg_kl = torch.clamp(log_prob.detach() - old_log_prob, -20.0, 20.0)
        metrics["actor/pg_clipfrac"] = _masked_mean(clipped.float(), response_mask).item()
        metrics["actor/ppo_kl"] = _masked_mean(-neg_kl, response_mask).item()
        metrics["actor/pg_clipfrac_lower"] = _masked_mean(clipped_lower.float(), response_mask).item()
    return loss, metrics
